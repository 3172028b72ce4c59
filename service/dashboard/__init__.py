"""The web dashboard, served by the API under ``/ui``: server-rendered pages (Jinja2) over the
same functions the REST routes run, a little vanilla JavaScript for live progress and uploads, and
CSS served from ``static/``; nothing is loaded from anywhere else."""

from service.dashboard.pages import install

__all__ = ["install"]
