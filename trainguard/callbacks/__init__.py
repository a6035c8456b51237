"""Built-in hooks: logging, progress, evaluation, signals and the run summary."""
