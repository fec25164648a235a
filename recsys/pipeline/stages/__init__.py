"""The pipeline's stages, one module per group that shares inputs: data (ingest, examples),
train (pretrain, transfer), evaluate, registry (sweep, register) and serve (deploy, smoke).

Every stage is ``stage_<name>(ctx: Context) -> None``: it decides per stage key whether to run
(``ctx.needed``), records typed outputs (``ctx.finish``) and puts what later stages and the
summary read into ``ctx.result``.
"""
