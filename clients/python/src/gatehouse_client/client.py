"""The Gatehouse job API over mutual TLS, on the standard library's ``ssl`` and ``http.client``."""

from __future__ import annotations

import http.client
import json
import ssl
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

#: States a job never leaves.
FINAL_STATES = frozenset({"succeeded", "failed", "dead_lettered", "cancelled"})

Json = Dict[str, Any]


class GatehouseError(Exception):
    """A refusal from the gatekeeper: the fields of its ``application/problem+json`` answer."""

    def __init__(self, status: int, problem: Mapping[str, Any], retry_after: Optional[float] = None):
        self.status = status
        self.problem: Json = dict(problem)
        #: The problem's slug (``unknown-kind``, ``schema-violation``, ``rate-limited``, ...).
        self.type: str = str(problem.get("type", "")).rsplit(":", 1)[-1]
        self.title: str = str(problem.get("title", ""))
        self.detail: str = str(problem.get("detail", ""))
        #: Field errors (``{"path": ..., "message": ...}``) of a validation problem.
        self.errors: List[Json] = list(problem.get("errors", []) or [])
        #: Seconds to wait before trying again (``429``, ``503``), when the answer says.
        self.retry_after = retry_after
        super().__init__(f"{status} {self.type}: {self.detail or self.title}")


@dataclass
class Event:
    """One Server-Sent Event of a job's stream: ``state`` (a transition, the last one with the
    whole status) or ``progress``."""

    event: str
    data: Json
    id: Optional[int] = None

    @property
    def final(self) -> bool:
        return self.event == "state" and self.data.get("status") in FINAL_STATES


@dataclass
class _Response:
    status: int
    headers: Mapping[str, str]
    body: bytes = field(repr=False)

    def json(self) -> Json:
        return json.loads(self.body) if self.body else {}


class Client:
    """One client identity (its certificate and key) talking to one gatekeeper.

    Holds one keep-alive connection; not for several threads at once.
    """

    def __init__(
        self,
        url: str,
        *,
        ca: str,
        cert: str,
        key: str,
        timeout: float = 30.0,
        operator_key: Optional[str] = None,
        catalog: Optional[str] = None,
    ):
        """``operator_key``: the operator's public key file (hex) that must have certified the
        worker key fields are sealed to; ``catalog``: the job catalog (``config/jobs.toml``)
        whose schemas say which fields are sealed. Both only for kinds with sealed fields."""
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme != "https" or not parsed.hostname:
            raise ValueError(f"the gatekeeper's url must be https://host[:port], not {url!r}")
        self._host = parsed.hostname
        self._port = parsed.port or 443
        self._timeout = timeout
        self._tls = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        self._tls.minimum_version = ssl.TLSVersion.TLSv1_2
        self._tls.load_cert_chain(cert, key)
        self._conn: Optional[http.client.HTTPSConnection] = None
        self._cert = cert
        self._operator_key = operator_key
        self._catalog = catalog
        self._sealed_kinds: Optional[Dict[str, List[str]]] = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- the API -------------------------------------------------------------------------------

    def submit(
        self,
        kind: str,
        payload: Any,
        *,
        priority: Optional[int] = None,
        wait: Optional[float] = None,
        delay_s: Optional[int] = None,
        not_before: Optional[str] = None,
        sequence: Optional[Tuple[str, int]] = None,
        idempotency_key: Optional[str] = None,
        seal: Optional[List[str]] = None,
    ) -> Json:
        """Submits a job; answers its status: final when it ended within ``wait`` seconds
        (``Prefer: wait``), else ``queued`` / ``scheduled`` with its ``status_url``.

        Fields the kind's schema marks sealed (in ``catalog``), or the JSON pointers in
        ``seal``, are sealed here to the certified worker key; such a job is bound to its
        idempotency key, made up when none is given."""
        body: Json = {"kind": kind, "payload": payload}
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key
        if priority is not None:
            body["priority"] = priority
        if delay_s is not None:
            body["delay_s"] = delay_s
        if not_before is not None:
            body["not_before"] = not_before
        if sequence is not None:
            body["sequence"] = {"key": sequence[0], "number": sequence[1]}
        body = self._sealed_body(body, seal)
        headers = {}
        if wait is not None:
            headers["Prefer"] = f"wait={max(0, int(round(wait)))}"
        return self._call("POST", "/v1/jobs", body, headers).json()

    def submit_batch(self, jobs: List[Json], *, on_complete: Optional[Json] = None) -> Json:
        """Submits jobs (submit bodies: ``{"kind", "payload", ...}``) accepted whole or refused
        whole (``GatehouseError`` ``batch-refused``, each refused job under ``/jobs/<i>``);
        answers ``{"id", "jobs": [ids in order], "status_url"}``. ``on_complete`` runs once every
        job is decided. Fields the catalog marks sealed are sealed as :meth:`submit` seals them."""
        sealed = [self._sealed_body(job) for job in jobs]
        body: Json = {"jobs": sealed}
        if on_complete is not None:
            body["on_complete"] = self._sealed_body(on_complete)
        return self._call("POST", "/v1/batches", body).json()

    def batch(self, batch_id: str) -> Json:
        """A batch of yours: ``status`` (queued, running, complete), ``counts`` by state, ``jobs``."""
        return self._call("GET", f"/v1/batches/{_id(batch_id)}").json()

    def submit_workflow(self, steps: List[Json]) -> Json:
        """Submits named steps (submit bodies with ``"name"`` and ``"after"``: the names of the
        steps each waits for), accepted whole or refused whole (``GatehouseError``
        ``workflow-refused``, each problem under ``/steps/<i>``); answers ``{"id", "steps": {name:
        job id}, "status_url", "events_url"}``. A step runs once every step it names is decided;
        one whose parent did not succeed ends ``cancelled`` (``parent-failed``) unless it says
        ``"on_parent_failure": "run"``. Sealed fields are sealed as :meth:`submit` seals them."""
        sealed = []
        for step in steps:
            meta = {k: step[k] for k in ("name", "after") if k in step}
            body = self._sealed_body({k: v for k, v in step.items() if k not in meta})
            sealed.append({**meta, **body})
        return self._call("POST", "/v1/workflows", {"steps": sealed}).json()

    def workflow(self, workflow_id: str) -> Json:
        """A workflow of yours: ``status`` (queued, running, complete), ``counts`` by state, and
        ``steps`` (each ``name``, ``id``, ``state``, ``after``)."""
        return self._call("GET", f"/v1/workflows/{_id(workflow_id)}").json()

    def _sealed_body(self, job: Json, paths: Optional[List[str]] = None) -> Json:
        """``job`` with the fields at ``paths`` (by default those its kind's schema marks sealed)
        sealed to the certified worker key, bound to its idempotency key (one made up if none)."""
        if paths is None:
            paths = self._sealed_fields(str(job.get("kind", "")))
        if not paths:
            return job
        from . import sealing

        out = dict(job)
        out["idempotency_key"] = out.get("idempotency_key") or uuid.uuid4().hex
        out["payload"] = sealing.seal_payload(
            job.get("payload"),
            paths,
            self._worker_key(),
            client=sealing.client_name(self._cert),
            kind=str(job["kind"]),
            idempotency_key=out["idempotency_key"],
        )
        return out

    def worker_keys(self) -> Json:
        """The worker key set as the gatekeeper serves it (``GET /v1/keys``), unchecked."""
        return self._call("GET", "/v1/keys").json()

    def _worker_key(self) -> bytes:
        from . import sealing

        if self._operator_key is None:
            raise sealing.SealingError("sealing needs the operator's public key (operator_key=...)")
        operator = sealing.read_operator_key(self._operator_key)
        public, _ = sealing.certified_key(self.worker_keys(), operator)
        return public

    def _sealed_fields(self, kind: str) -> List[str]:
        if self._catalog is None:
            return []
        if self._sealed_kinds is None:
            from . import sealing

            self._sealed_kinds = sealing.catalog_sealed_paths(self._catalog)
        return self._sealed_kinds.get(kind, [])

    def status(self, job_id: str) -> Json:
        """The job's status (its result or error once it ended); ``404`` for another client's."""
        return self._call("GET", f"/v1/jobs/{_id(job_id)}").json()

    def list_jobs(
        self,
        *,
        state: Optional[str] = None,
        kind: Optional[str] = None,
        submitted_after: Optional[str] = None,
        batch: Optional[str] = None,
        workflow: Optional[str] = None,
        limit: Optional[int] = None,
        cursor: Optional[str] = None,
    ) -> Json:
        """One page of your jobs (of one batch or workflow, if given), newest first, metadata
        only: ``{"jobs": [...], "next_cursor": ...}`` (pass ``next_cursor`` as ``cursor`` for the
        next page)."""
        params = {
            "state": state,
            "kind": kind,
            "submitted_after": submitted_after,
            "batch": batch,
            "workflow": workflow,
            "limit": limit,
            "cursor": cursor,
        }
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        return self._call("GET", "/v1/jobs" + (f"?{query}" if query else "")).json()

    def iter_jobs(self, **filters: Any) -> Iterator[Json]:
        """Every job :meth:`list_jobs` selects, page after page."""
        cursor = None
        while True:
            page = self.list_jobs(cursor=cursor, **filters)
            yield from page["jobs"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def cancel(self, job_id: str) -> Json:
        """Cancels the job unless it ended; answers its status afterwards."""
        return self._call("DELETE", f"/v1/jobs/{_id(job_id)}").json()

    def wait(self, job_id: str, timeout: float = 60.0) -> Json:
        """Follows the job's event stream until it ends; answers its final status.

        Raises ``TimeoutError`` when it has not ended within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        for event in self.events(job_id, deadline=deadline):
            if event.final:
                return self.status(job_id)
        raise TimeoutError(f"job {job_id} did not end within {timeout} s")

    def events(
        self, job_id: str, last_event_id: Optional[int] = None, *, deadline: Optional[float] = None
    ) -> Iterator[Event]:
        """The job's live events, in order, until the final state. A stream the gatekeeper ends
        (after its ``max_stream_s``) or that drops is opened again with ``Last-Event-ID``: no
        transition is lost or repeated."""
        last = last_event_id
        while True:
            if deadline is not None and time.monotonic() >= deadline:
                return
            headers = {"Accept": "text/event-stream"}
            if last is not None:
                headers["Last-Event-ID"] = str(last)
            conn = self._connect()
            try:
                conn.request("GET", f"/v1/jobs/{_id(job_id)}/events", headers=headers)
                res = conn.getresponse()
                if res.status != 200:
                    raise _error(res.status, res.getheaders(), res.read())
                for event in _sse(res):
                    if event.id is not None:
                        last = event.id
                    yield event
                    if event.final:
                        return
                    if deadline is not None and time.monotonic() >= deadline:
                        return
            except (OSError, http.client.HTTPException):
                time.sleep(0.2)  # dropped: resume from the last event
            finally:
                conn.close()

    # -- transport -----------------------------------------------------------------------------

    def _connect(self) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(self._host, self._port, context=self._tls, timeout=self._timeout)

    def _call(
        self, method: str, path: str, body: Optional[Json] = None, headers: Optional[Mapping[str, str]] = None
    ) -> _Response:
        data = json.dumps(body).encode() if body is not None else None
        all_headers = {"Accept": "application/json"}
        if data is not None:
            all_headers["Content-Type"] = "application/json"
        all_headers.update(headers or {})
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = self._connect()
            try:
                self._conn.request(method, path, body=data, headers=all_headers)
                res = self._conn.getresponse()
                raw = res.read()
            except (ConnectionError, http.client.RemoteDisconnected, http.client.CannotSendRequest):
                # A keep-alive connection the server closed meanwhile: once more on a new one.
                self.close()
                if attempt == 2:
                    raise
                continue
            if res.will_close:
                self.close()
            if res.status >= 400:
                raise _error(res.status, res.getheaders(), raw)
            return _Response(res.status, dict(res.getheaders()), raw)
        raise AssertionError("unreachable")


def _id(job_id: str) -> str:
    return urllib.parse.quote(job_id, safe="")


def _error(status: int, headers: List[Tuple[str, str]], raw: bytes) -> GatehouseError:
    try:
        problem = json.loads(raw) if raw else {}
        if not isinstance(problem, dict):
            problem = {"detail": str(problem)}
    except ValueError:
        problem = {"detail": raw.decode("utf-8", "replace")[:500]}
    retry: Optional[float] = None
    for name, value in headers:
        if name.lower() == "retry-after":
            try:
                retry = float(value)
            except ValueError:
                pass
    return GatehouseError(status, problem, retry)


def _sse(res: http.client.HTTPResponse) -> Iterator[Event]:
    """Server-Sent Events from a response, one at a time as they arrive."""
    name: str = "message"
    data: List[str] = []
    ident: Optional[int] = None
    while True:
        line = res.readline()
        if not line:
            return
        text = line.decode("utf-8").rstrip("\r\n")
        if text == "":
            if data:
                yield Event(name, json.loads("\n".join(data)), ident)
            name, data, ident = "message", [], None
        elif text.startswith(":"):
            continue
        else:
            key, _, value = text.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if key == "event":
                name = value
            elif key == "data":
                data.append(value)
            elif key == "id":
                ident = int(value) if value.isdigit() else None

