"""POST /tokenize and POST /detokenize, as vLLM serves them: the served model's tokenizer (and chat
template) without generating anything. Behind the API key when keys are configured."""

from fastapi import APIRouter, Depends

from apex_serve.errors import InvalidArgument
from gateway import validation
from gateway.chat_template import ChatOptions
from gateway.generation import Generator
from gateway.http_api.dependencies import GeneratorDep, require_api_key
from gateway.http_api.errors import error_responses
from gateway.http_api.tokenization_schemas import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.post("/tokenize", response_model_exclude_none=True, responses=error_responses(400, 401, 404, 413))
async def tokenize(body: TokenizeRequest, gen: GeneratorDep) -> TokenizeResponse:
    validation.check_model(body.model or "", gen.model_name)
    if (body.prompt is None) == (body.messages is None):
        raise InvalidArgument("prompt", "give either a prompt or messages (the chat form), not both nor neither")
    if body.prompt is not None:
        text, special = body.prompt, body.add_special_tokens is not False
    else:
        text, special = _rendered(body, gen), body.add_special_tokens is True
    encoding = gen.tokenizer.encode(text, add_special_tokens=special)
    return TokenizeResponse(
        count=len(encoding.ids), max_model_len=gen.worker.max_model_len, tokens=encoding.ids,
        token_strs=encoding.tokens if body.return_token_strs else None,
    )


def _rendered(body: TokenizeRequest, gen: Generator) -> str:
    if gen.chat_template is None:
        raise InvalidArgument("messages", f"model '{gen.model_name}' has no chat template; send a prompt")
    messages = [m.template_message(i) for i, m in enumerate(body.messages or ())]
    options = ChatOptions(body.add_generation_prompt, body.continue_final_message, body.chat_template_kwargs or {})
    return gen.chat_template.render(messages, options)


@router.post("/detokenize", responses=error_responses(400, 401, 404, 413))
async def detokenize(body: DetokenizeRequest, gen: GeneratorDep) -> DetokenizeResponse:
    validation.check_model(body.model or "", gen.model_name)
    vocab_size = gen.tokenizer.get_vocab_size(with_added_tokens=True)
    bad = next((t for t in body.tokens if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidArgument("tokens", f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    return DetokenizeResponse(prompt=gen.tokenizer.decode(body.tokens, skip_special_tokens=False))
