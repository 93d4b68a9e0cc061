from kubetune.cli import app

app(prog_name="kubetune")
