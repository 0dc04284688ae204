"""`lookalike serve`: the REST API and web page over an index, under uvicorn."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError

from ..errors import ConfigError
from ..serve.settings import ServeSettings

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def parse_rankers(specs: list[str]) -> dict[str, Path]:
    """NAME=RUN_DIR pairs of --ranker into a mapping."""
    rankers: dict[str, Path] = {}
    for spec in specs:
        name, sep, run = (part.strip() for part in spec.partition("="))
        if not sep or not name or not run:
            raise ConfigError(f"--ranker {spec!r}: write it as NAME=RUN_DIR, e.g. --ranker sleeve=runs/sleeve")
        if name in rankers:
            raise ConfigError(f"--ranker {name} is given twice; each ranker needs its own name")
        rankers[name] = Path(run)
    return rankers


def settings_from_options(**options) -> ServeSettings:
    try:
        settings = ServeSettings(**options)
    except ValidationError as e:
        problems = "; ".join(f"--{'-'.join(str(p) for p in err['loc']).replace('_', '-')}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"invalid serve options: {problems}") from None
    if settings.allow_writes and settings.api_key is None:
        raise ConfigError("--allow-writes needs an API key: pass --api-key or set LOOKALIKE_API_KEY, so that only key holders can change the catalog")
    return settings


def register(app: typer.Typer) -> None:
    """Add the `serve` command to the main CLI."""

    @app.command()
    def serve(
        index: Path = typer.Option(..., "--index", "-i", help="Index directory built by `lookalike index build`; with --backend milvus, the collection's name."),
        backend: str = typer.Option("faiss", "--backend", help="Where the index lives: faiss (the --index folder) or milvus (a collection in Milvus at --uri)."),
        uri: Optional[str] = typer.Option(None, "--uri", help="With --backend milvus: a Milvus Lite file (catalog.db) or a server (http://host:19530)."),
        run: Optional[Path] = typer.Option(None, "--model", "-m", "--run", "-r", help="Model folder (`lookalike fit`) or run folder that embeds queries; default: the one the index was built with."),
        host: str = typer.Option("127.0.0.1", help="Address to listen on. Loopback by default; use 0.0.0.0 only behind a proxy or firewall."),
        port: int = typer.Option(8000, help="TCP port."),
        api_key: Optional[str] = typer.Option(None, "--api-key", envvar="LOOKALIKE_API_KEY", help="Key (16+ characters) that catalog writes must send as X-API-Key."),
        allow_writes: bool = typer.Option(False, "--allow-writes", help="Enable POST /catalog and DELETE /catalog/{id} (needs --api-key)."),
        upload_dir: Optional[Path] = typer.Option(None, help="Where images added through the API are stored; default: <INDEX>-uploads next to the index."),
        max_upload_mb: float = typer.Option(20.0, help="Largest request body accepted, in MB (413 beyond)."),
        max_concurrency: int = typer.Option(2, help="Model jobs (embedding, thumbnails) run at once; about the number of CPU cores."),
        max_batch: int = typer.Option(16, help="Most uploads embedded together in one model call."),
        batch_wait_ms: float = typer.Option(5.0, help="Milliseconds an upload may wait for others to share its model call."),
        timeout: float = typer.Option(30.0, help="Seconds a request may wait for a model slot or run, or stall while uploading (503 / 408)."),
        header_timeout: float = typer.Option(10.0, help="Seconds a client may take to send a request's headers; slower connections are closed (slowloris)."),
        upload_deadline: float = typer.Option(120.0, help="Seconds a client may take to send a whole request body (408 beyond)."),
        similar_cache_mb: float = typer.Option(32.0, help="Memory for GET /images/{id}/similar answers, in MB (LRU, emptied when the index changes; 0 = off)."),
        access_log: bool = typer.Option(True, "--access-log/--no-access-log", help="Log a line per request to stdout (about a fifth of the CPU of a cached /similar answer)."),
        ranker: list[str] = typer.Option([], "--ranker", help="Extra ranker for /compare, as NAME=RUN_DIR (repeatable); probabilities are fused."),
    ):
        """Serve similarity search over an index: REST API (docs at /docs), web page at /, metrics at /metrics."""
        import uvicorn

        from ..serve.app import create_app
        from ..serve.connections import header_deadline_protocol
        from ..serve.service import Service

        settings = settings_from_options(
            index_dir=index,
            index_backend=backend,
            index_uri=uri,
            run_dir=run,
            host=host,
            port=port,
            api_key=api_key,
            allow_writes=allow_writes,
            upload_dir=upload_dir,
            max_upload_mb=max_upload_mb,
            max_concurrency=max_concurrency,
            max_batch=max_batch,
            batch_wait_ms=batch_wait_ms,
            timeout_s=timeout,
            header_timeout_s=header_timeout,
            upload_deadline_s=upload_deadline,
            similar_cache_mb=similar_cache_mb,
        )
        if host not in LOOPBACK:
            typer.secho(f"listening on {host}: the service is reachable from other machines", fg="yellow", err=True)
        engine = Service(settings, parse_rankers(ranker))
        try:
            typer.echo(f"lookalike serving {engine.index.location} on http://{host}:{port}/ (API docs at /docs)")
            uvicorn.run(
                create_app(engine),
                host=host,
                port=port,
                log_level="info",
                access_log=access_log,
                server_header=False,
                timeout_keep_alive=5,
                http=header_deadline_protocol(settings.header_timeout_s),
            )
        finally:
            engine.close()
