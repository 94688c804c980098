"""GET /v1/models and /v1/models/{model}: the one model this gateway serves."""

from fastapi import APIRouter, Depends, Request

from apex_serve.errors import NotFound
from gateway.http_api.dependencies import GeneratorDep, require_api_key
from gateway.http_api.errors import error_responses
from gateway.http_api.responses import ModelCard, ModelList

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


def _card(request: Request, gen: GeneratorDep) -> ModelCard:
    return ModelCard(id=gen.model_name, created=request.app.state.created, max_model_len=gen.worker.max_model_len)


@router.get("/models", responses=error_responses(401))
async def list_models(request: Request, gen: GeneratorDep) -> ModelList:
    return ModelList(data=[_card(request, gen)])


@router.get("/models/{model:path}", responses=error_responses(401, 404))
async def get_model(model: str, request: Request, gen: GeneratorDep) -> ModelCard:
    if model != gen.model_name:
        raise NotFound(f"model '{model}' is not served here; this server serves '{gen.model_name}'")
    return _card(request, gen)
