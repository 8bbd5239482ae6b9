"""The serving stage: the grounding endpoint (image + expression -> box + mask) on Ray Serve.

Entry point: :func:`build_app`, the application ``serve run pipelines.serve:build_app`` and Serve config files
name, taking :class:`ServeSettings`.

Modules:
    app: the FastAPI ingress deployment and :func:`build_app`.
    settings: the typed settings of the application.
    requests: parsing and checking what clients send (no Ray).
    images: opening uploaded images, checked before they are decoded.
    errors: every error code a client can receive, and the exception that carries one.
    schema: the HTTP response models and request bodies, as OpenAPI publishes them.
    model: the batched model deployment.
    client: :class:`GroundingClient`, the Python client of the endpoint (no Ray).
    static/: the browser page served at ``/``.
"""

from pipelines.runtime import lazy_exports

__all__ = ["GroundingClient", "GroundingError", "GroundingResult", "ServeSettings", "build_app"]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "GroundingClient": "pipelines.serve.client",
        "GroundingError": "pipelines.serve.client",
        "GroundingResult": "pipelines.serve.client",
        "ServeSettings": "pipelines.serve.settings",
        "build_app": "pipelines.serve.app",
    },
)
