"""The optimizers: the N:M state engine, the mask rules that plug into it, and the thin
optimizer classes that wire ``state`` / ``param_groups`` to both."""
