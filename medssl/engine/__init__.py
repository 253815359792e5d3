"""Training engines: ``medssl.engine.pretrain.pretrain`` (self-supervised loop), ``medssl.engine.finetune.finetune``
(task heads) and ``medssl.engine.predict`` (inference), thin loops on ``medssl.engine.runner``."""
