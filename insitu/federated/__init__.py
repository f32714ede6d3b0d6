"""Federated continual pretraining of adapters across sites that cannot pool their images (Flower).

`aggregate` (checks and FedAvg, pure numpy), `site` (one site's local rounds on the normal
pretraining module), `flower` (the Flower strategy, client and simulation), `run` (the
``insitu federate`` commands and the server's outputs). See docs/federated.md.
"""
