"""The trainer: the code inside the trainer image and behind `kubetune run`."""
