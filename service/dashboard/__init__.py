"""The web dashboard, served by the API under ``/ui``: server-rendered pages (Jinja2) over the
same functions the REST routes run, a little vanilla JavaScript for live progress and uploads, and
CSS served from ``static/``; nothing is loaded from anywhere else."""

from fastapi import FastAPI

from service.dashboard import merge_pages, pages, watch_pages

__all__ = ["install"]


def install(app: FastAPI) -> None:
    """Mount the pages (scans and the rest, merges, watches) and their static files."""
    pages.install(app)
    app.include_router(merge_pages.router)
    app.include_router(watch_pages.router)
