"""Training engines: ``medssl.engine.pretrain.pretrain`` (self-supervised loop) and
``medssl.engine.checkpoint.load_model`` (rebuild a trained network from a run folder)."""
