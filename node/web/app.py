"""The web application: server-rendered pages with Jinja2 templates on Starlette.

Every page needs a login. Unauthenticated requests to ``/api/...`` get 401 with a JSON body,
other pages redirect to the login page. The only state-changing requests are login, logout
and the retry of a study's failed jobs, and all three are POST forms that carry the session's
CSRF token. The session lives in a cookie signed with the key from
:func:`node.web.auth.load_or_create_secret`.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from sqlalchemy import Engine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from node.config import Settings
from node.db import session_scope
from node.models import Job
from node.overlay import OVERLAY_NAMES, VIEWS, write_series_overlays
from node.reports import (
    DISPLAY_STATES,
    SeriesFilter,
    StudyNotFoundError,
    node_health,
    query_series,
    retry_study,
    retryable_job_ids,
    study_detail,
)
from node.spool import Spool
from node.web.auth import check_login, csrf_token_matches, load_or_create_secret, new_csrf_token

logger = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"

SESSION_COOKIE = "livernode_session"

#: Paths served without a login.
PUBLIC_PATHS = frozenset({"/login", "/favicon.ico"})

#: Response headers sent with every page: no framing, no scripts, styles only inline.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def create_app(settings: Settings, engine: Engine) -> Starlette:
    """Build the web application.

    Parameters
    ----------
    settings : Settings
        Uses ``web``, ``scp`` (for the health page), ``spool_dir`` and ``data_dir``.
    engine : sqlalchemy.Engine
        Database from :func:`node.db.init_db`.

    Returns
    -------
    starlette.applications.Starlette
        The ASGI application.
    """
    pages = WebPages(settings, engine)
    routes = [
        Route("/", pages.home),
        Route("/login", pages.login_form, methods=["GET"]),
        Route("/login", pages.login, methods=["POST"]),
        Route("/logout", pages.logout, methods=["POST"]),
        Route("/studies", pages.studies),
        Route("/studies/{study_uid}", pages.study),
        Route("/studies/{study_uid}/retry", pages.retry, methods=["POST"]),
        Route("/studies/{study_uid}/jobs/{job_id:int}/overlays/{name}.png", pages.overlay),
        Route("/health", pages.health),
        Route("/api/studies", pages.api_studies),
        Route("/api/studies/{study_uid}", pages.api_study),
        Route("/api/health", pages.api_health),
    ]
    secret = load_or_create_secret(Path(settings.data_dir), settings.web.secret_key)
    middleware = [
        Middleware(
            SessionMiddleware,
            secret_key=secret,
            session_cookie=SESSION_COOKIE,
            max_age=settings.web.session_max_age_s,
            same_site="strict",
            https_only=False,
        ),
        Middleware(LoginRequiredMiddleware, users=settings.web.users),
    ]
    if not settings.web.users:
        logger.warning(
            "The web page has no users, so no one can log in: add [web] users with hashes from "
            "livernode web hash-password"
        )
    return Starlette(routes=routes, middleware=middleware)


class LoginRequiredMiddleware(BaseHTTPMiddleware):
    """Return 401 (``/api/...``) or redirect to the login page when no user is logged in."""

    def __init__(self, app: Any, users: dict[str, str]) -> None:
        super().__init__(app)
        self.users = users

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        if request.url.path not in PUBLIC_PATHS and current_user(request, self.users) is None:
            if request.url.path.startswith("/api/"):
                response: Response = JSONResponse({"detail": "login required"}, status_code=401)
            else:
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                response = RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
        else:
            response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response


def current_user(request: Request, users: dict[str, str]) -> str | None:
    """Return the logged-in user name, or None when no user, or a user no longer configured, is logged in."""
    user = request.session.get("user")
    return user if isinstance(user, str) and user in users else None


class WebPages:
    """Request handlers of :func:`create_app`, sharing the settings, database and templates."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.templates = Jinja2Templates(directory=str(TEMPLATE_DIR))
        self.templates.env.filters["number"] = _format_number
        self.templates.env.globals["views"] = VIEWS
        self._overlay_lock = threading.Lock()

    # Login ------------------------------------------------------------------------------

    async def login_form(self, request: Request) -> Response:
        return self._render(request, "login.html", {"next": _safe_next(request.query_params.get("next"))})

    async def login(self, request: Request) -> Response:
        form = await request.form()
        user_name = str(form.get("username", ""))
        password = str(form.get("password", ""))
        next_path = _safe_next(str(form.get("next", "")))

        if not csrf_token_matches(request.session.get("csrf"), str(form.get("csrf_token", ""))):
            logger.warning("Web login from %s rejected: missing or invalid CSRF token", _client(request))
            return self._render(
                request, "login.html", {"next": next_path, "error": "The form expired; try again."}, 403
            )
        if not check_login(self.settings.web.users, user_name, password):
            logger.warning("Web login of user %r from %s failed", user_name, _client(request))
            return self._render(
                request, "login.html", {"next": next_path, "error": "Invalid user name or password."}, 401
            )

        request.session.clear()
        request.session["user"] = user_name
        request.session["csrf"] = new_csrf_token()
        logger.info("Web user %r logged in from %s", user_name, _client(request))
        return RedirectResponse(next_path, status_code=303)

    async def logout(self, request: Request) -> Response:
        form = await request.form()
        if not csrf_token_matches(request.session.get("csrf"), str(form.get("csrf_token", ""))):
            return self._forbidden(request)
        logger.info("Web user %r logged out", request.session.get("user"))
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    # Pages ------------------------------------------------------------------------------

    async def home(self, request: Request) -> Response:
        return RedirectResponse("/studies", status_code=303)

    async def studies(self, request: Request) -> Response:
        filters, errors = _parse_filters(request)
        page = _parse_page(request.query_params.get("page"))
        page_size = self.settings.web.page_size
        rows, total = query_series(self.engine, filters, limit=page_size, offset=(page - 1) * page_size)
        page_count = max(1, -(-total // page_size))

        query = {
            key: value
            for key, value in (
                ("since", request.query_params.get("since", "")),
                ("until", request.query_params.get("until", "")),
                ("state", filters.state or ""),
                ("calling_ae", filters.calling_ae_title or ""),
            )
            if value
        }
        context = {
            "rows": rows,
            "total": total,
            "page": page,
            "page_count": page_count,
            "filters": query,
            "states": DISPLAY_STATES,
            "errors": errors,
            "previous_url": f"/studies?{urlencode({**query, 'page': page - 1})}" if page > 1 else None,
            "next_url": f"/studies?{urlencode({**query, 'page': page + 1})}" if page < page_count else None,
        }
        return self._render(request, "studies.html", context, 400 if errors else 200)

    async def study(self, request: Request) -> Response:
        study_uid = request.path_params["study_uid"]
        try:
            detail = study_detail(self.engine, study_uid)
            retryable = retryable_job_ids(self.engine, study_uid)
        except StudyNotFoundError as error:
            return self._render(request, "error.html", {"message": str(error)}, 404)

        for series in detail["series"]:
            for job in series["jobs"]:
                job["overlay_names"] = _overlay_names(job)
        detail["events"] = group_repeated_events(detail["events"])
        context = {"detail": detail, "retryable": retryable, "study_uid": study_uid}
        return self._render(request, "study.html", context)

    async def retry(self, request: Request) -> Response:
        study_uid = request.path_params["study_uid"]
        form = await request.form()
        if not csrf_token_matches(request.session.get("csrf"), str(form.get("csrf_token", ""))):
            logger.warning("Retry of study %s rejected: missing or invalid CSRF token", study_uid)
            return self._forbidden(request)

        user = request.session["user"]
        try:
            job_ids = retry_study(self.engine, study_uid, requested_by=f"web user {user}")
        except StudyNotFoundError as error:
            return self._render(request, "error.html", {"message": str(error)}, 404)

        if job_ids:
            request.session["flash"] = f"Queued again: job {', '.join(map(str, job_ids))}."
        else:
            request.session["flash"] = "No failed job to queue again."
        return RedirectResponse(f"/studies/{quote(study_uid, safe='')}", status_code=303)

    async def overlay(self, request: Request) -> Response:
        study_uid = request.path_params["study_uid"]
        job_id = request.path_params["job_id"]
        name = request.path_params["name"]
        path = self._overlay_path(study_uid, job_id, name)
        if path is None:
            return Response("overlay picture not found", status_code=404, media_type="text/plain")
        return FileResponse(path, media_type="image/png")

    async def health(self, request: Request) -> Response:
        health = node_health(self.engine, self.settings.scp.host, self.settings.scp.port)
        return self._render(request, "health.html", {"health": health})

    # JSON -------------------------------------------------------------------------------

    async def api_studies(self, request: Request) -> Response:
        filters, errors = _parse_filters(request)
        if errors:
            return JSONResponse({"detail": errors}, status_code=400)
        page = _parse_page(request.query_params.get("page"))
        page_size = self.settings.web.page_size
        rows, total = query_series(self.engine, filters, limit=page_size, offset=(page - 1) * page_size)
        return JSONResponse({"total": total, "page": page, "rows": rows})

    async def api_study(self, request: Request) -> Response:
        try:
            return JSONResponse(study_detail(self.engine, request.path_params["study_uid"]))
        except StudyNotFoundError as error:
            return JSONResponse({"detail": str(error)}, status_code=404)

    async def api_health(self, request: Request) -> Response:
        health = node_health(self.engine, self.settings.scp.host, self.settings.scp.port)
        return JSONResponse(health, status_code=200 if health["ok"] else 503)

    # Helpers ----------------------------------------------------------------------------

    def _render(
        self, request: Request, template: str, context: dict[str, Any], status_code: int = 200
    ) -> Response:
        if "csrf" not in request.session:
            request.session["csrf"] = new_csrf_token()
        base = {
            "user": current_user(request, self.settings.web.users),
            "csrf_token": request.session["csrf"],
            "flash": request.session.pop("flash", None),
        }
        return self.templates.TemplateResponse(request, template, {**base, **context}, status_code=status_code)

    def _forbidden(self, request: Request) -> Response:
        message = "The form expired or did not come from this page; reload the page and try again."
        return self._render(request, "error.html", {"message": message}, 403)

    def _overlay_path(self, study_uid: str, job_id: int, name: str) -> Path | None:
        if name not in OVERLAY_NAMES:
            return None
        with session_scope(self.engine) as session:
            job = session.get(Job, job_id)
            if job is None or job.series.study.study_instance_uid != study_uid or not job.output_dir:
                return None
            series_uid = job.series.series_instance_uid
            output_dir = Path(job.output_dir)
            overlays = dict((job.output_paths or {}).get("overlays") or {})
            mask = (job.output_paths or {}).get("mask")
            result = dict(job.result or {})

        listed = overlays.get(name)
        if listed and Path(listed).is_file():
            return Path(listed)
        cached = output_dir / f"{name}.png"
        if cached.is_file():
            return cached
        if not mask or not Path(mask).is_file():
            return None

        # Results from before the worker wrote pictures: render them once into the output folder.
        series_dir = Spool(self.settings.spool_dir).series_dir(study_uid, series_uid)  # type: ignore[arg-type]
        with self._overlay_lock:
            if not cached.is_file():
                try:
                    write_series_overlays(series_dir, Path(mask), output_dir, result)
                except Exception as error:  # noqa: BLE001 - a missing preview is a 404, not a crash
                    logger.error(
                        "Overlay pictures of job %d (series %s) could not be rendered: %s: %s",
                        job_id, series_uid, error.__class__.__name__, error,
                    )
                    return None
        return cached if cached.is_file() else None


def group_repeated_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge runs of consecutive events of one kind, series, job and calling AE into one row.

    A series of hundreds of instances gives one ``received`` event per instance; the page
    shows them as one row with ``count`` and the time of the last one in ``last_created_at``.
    """
    grouped: list[dict[str, Any]] = []
    for event in events:
        previous = grouped[-1] if grouped else None
        same_run = previous is not None and all(
            previous[key] == event[key]
            for key in ("kind", "series_instance_uid", "job_id", "calling_ae_title")
        )
        if same_run:
            previous["count"] += 1
            previous["last_created_at"] = event["created_at"]
        else:
            grouped.append({**event, "count": 1, "last_created_at": event["created_at"]})
    return grouped


def _overlay_names(job: dict[str, Any]) -> list[str]:
    if job["overlays"]:
        return [name for name in OVERLAY_NAMES if name in job["overlays"]]
    has_mask = any(output["name"] == "mask" and output["exists"] for output in job["outputs"])
    if not has_mask:
        return []
    foci = ["liver", "tumour"] if job.get("tumor_count") else ["liver"]
    return [f"overlay_{focus}_{view}" for focus in foci for view in VIEWS]


def _parse_filters(request: Request) -> tuple[SeriesFilter, list[str]]:
    errors: list[str] = []
    params = request.query_params

    def date(key: str) -> dt.date | None:
        text = params.get(key, "").strip()
        if not text:
            return None
        try:
            return dt.date.fromisoformat(text)
        except ValueError:
            errors.append(f"{key} = {text!r} is not a date: use YYYY-MM-DD")
            return None

    state = params.get("state", "").strip() or None
    if state is not None and state not in DISPLAY_STATES:
        errors.append(f"state = {state!r} is invalid: use one of {', '.join(DISPLAY_STATES)}")
        state = None
    filters = SeriesFilter(
        since=date("since"),
        until=date("until"),
        state=state,
        calling_ae_title=params.get("calling_ae", "").strip() or None,
    )
    return filters, errors


def _parse_page(text: str | None) -> int:
    try:
        return max(1, int(text or 1))
    except ValueError:
        return 1


def _safe_next(target: str | None) -> str:
    # Only local paths, so the login cannot redirect to another site.
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/studies"


def _client(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown address"


def _format_number(value: Any, digits: int = 2) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.{digits}f}"
    return "-"
