"""Federated cross-platform pretraining: each platform (shop) is a client that trains on its own
logs and sends only model updates; the server aggregates them (FedAvg, FedProx, FedAdam,
optionally with client-level DP). Ray actors, not Flower: see :mod:`recsys.federated.server`."""
