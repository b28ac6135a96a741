"""The peers' methods that do not fit the engine's "the parameter is the weight" shape: the
straight-through family (SR-STE, LBC) and bidirectional masks."""
