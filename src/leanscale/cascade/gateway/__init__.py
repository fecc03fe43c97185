"""An OpenAI-compatible LLM gateway (``pip install 'leanscale[gateway]'``): one endpoint in front of
several OpenAI-compatible backends, with fallback chains, cost accounting per request, client
keys, limits and Prometheus metrics. See ``README.md`` in this folder.

* :class:`GatewayConfig` -- the models, prices, fallbacks and keys (YAML or dict, validated);
* :func:`create_gateway_app` / :func:`serve_gateway` -- the FastAPI app and its uvicorn server;
* :class:`~leanscale.cascade.gateway.testing.FakeOpenAIBackend` -- a fake backend for tests and
  benchmarks (in ``leanscale.cascade.gateway.testing``).

Importing this package needs only PyYAML-free standard modules; FastAPI, httpx, uvicorn and
prometheus_client are imported when an app is built.
"""

from leanscale.cascade.gateway.app import create_gateway_app, serve_gateway
from leanscale.cascade.gateway.config import GatewayConfig, ModelConfig

__all__ = ["GatewayConfig", "ModelConfig", "create_gateway_app", "serve_gateway"]
