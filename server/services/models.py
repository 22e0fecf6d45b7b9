"""GET /v1/models and /v1/models/{id}: the served id and its configured aliases."""

from __future__ import annotations

from neuronguard.server.protocol import ModelCard, ModelList
from neuronguard.server.services.common import ServiceContext, model_not_found


class ModelCatalog:
    def __init__(self, ctx: ServiceContext, created: int) -> None:
        self.runtime = ctx.runtime
        self.created = created  # when the model was loaded

    def list(self) -> ModelList:
        return ModelList(data=[ModelCard(id=name, created=self.created) for name in self.runtime.names.ids])

    def card(self, model_id: str) -> ModelCard:
        """A listed id's card; any other id is a 404 (requests may still name any model when no names are set)."""
        if model_id not in self.runtime.names.ids:
            raise model_not_found(self.runtime, model_id)
        return ModelCard(id=model_id, created=self.created)
