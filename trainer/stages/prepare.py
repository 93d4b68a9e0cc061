"""prepare: tokenizer and data (formats, templates, labels, splits), then the trainable model."""

from __future__ import annotations

from transformers import set_seed

from kubetune.trainer import exports, modeling
from kubetune.trainer.context import RunContext
from kubetune.trainer.data import prepare
from kubetune.validation import InvalidJob


def run(ctx: RunContext) -> None:
    assert ctx.model_source is not None and ctx.train_file is not None
    ctx.tokenizer = modeling.load_tokenizer(ctx.spec, ctx.model_source)
    if ctx.spec.export.formats:
        config = modeling.load_config(ctx.spec, ctx.model_source).to_dict()
        found = exports.problems(ctx.spec, config, ctx.tokenizer)
        if found:
            raise InvalidJob("export", found)  # now, not after training
    ctx.data = prepare(
        ctx.spec.dataset,
        ctx.spec.training,
        ctx.tokenizer,
        seed=ctx.spec.training.seed,
        train_path=ctx.train_file,
        validation_path=ctx.validation_file,
    )
    for line in ctx.data.report.lines():
        ctx.reporter.log(line)
    if ctx.data.chat_template is not None:
        # Saved with every artifact: the result renders chats the way it was trained on them.
        ctx.tokenizer.chat_template = ctx.data.chat_template
    set_seed(ctx.spec.training.seed)  # adapter initialisation is random too
    ctx.model = modeling.trainable_model(ctx.spec, ctx.model_source)
    trainable, total = modeling.parameter_counts(ctx.model)
    ctx.reporter.log(
        f"model: {ctx.spec.method} on {modeling.device().type}, "
        f"{trainable:,} of {total:,} parameters trainable ({trainable / total:.1%})"
    )
