"""A small Python client for the G-code fingerprint API (httpx; no numpy needed, numpy arrays accepted).

    from api.client import GCodeAPIClient

    with GCodeAPIClient("http://127.0.0.1:8000", timeout=5.0) as api:
        api.health_check()                                   # True
        info = api.info()                                    # version, window, feature order, ...
        r = api.predict(continuous, categorical, return_fingerprint=True)   # window x F, window x C raw readings
        r = api.predict(columns={"spindle": [...], "stat": [...], ...})       # or raw log columns by name
        r["gcode_sequence"], r["operation"]["name"], r["operation"]["confidence"]
        rs = api.batch_predict([(cont1, cat1), (cont2, cat2)], method="beam", beam_width=4)
        fp = api.get_fingerprint(continuous, categorical)["fingerprint"]
        r = api.predict(continuous, categorical, binary=True)  # float32 body: ~2x cheaper to parse than JSON
        r = api.stream("mill-3", rows_cont, rows_cat, start=True)  # a machine's rows, in order from its program start
        for p in r["predictions"]: p["row"], p["gcode_sequence"], p["operation"]["name"]
        api.stream_state("mill-3"), api.end_stream("mill-3")
        # Open Inference Protocol (v2): N windows at once, optionally pinned to a loaded version
        out = api.v2_infer(conts, cats, binary=True, version="v7")  # [N, W, F], [N, W, C]
        out["gcode"][i], out["operation"][i], out["fingerprint"][i]; api.v2_model_metadata(), api.v2_ready()

A server that asks for client tokens (GCODEFP_API_TOKENS_FILE) gets `token=` (default: the
GCODEFP_API_TOKEN environment variable) as `Authorization: Bearer <token>` on every request. An https
server (`gcodefp serve --tls-cert`) signed by a private CA wants `verify="ca.pem"`.

Errors raise APIError subclasses: APIValidationError (422/413: the message names the field),
APIAuthError (401: no or unknown token; 403: the token may not stream this machine),
APIUnavailableError (503: no model yet, or the worker is overloaded: `retry_after` seconds),
APINotFoundError (404: e.g. an unknown stream session), APIConnectionError, APITimeoutError.
busy_retries=N: a request an overloaded worker refused (503 with Retry-After) is sent again, up to N
times, after the server's Retry-After (and up to half as long again, at random: clients refused
together do not return together). Safe for every call, /stream included: a refused request was
never applied.
stream_retries=N (default 2): a /stream chunk whose answer was lost (the connection dropped or timed
out) is sent again, up to N times, with the same Idempotency-Key, so the server applies its rows once.
"""
from __future__ import annotations

import os
import random
import ssl
import struct
import time
import uuid
from urllib.parse import quote

import httpx
import orjson


class APIError(Exception):
    """An error answer from the server (or none at all)."""

    def __init__(self, message: str, status: int | None = None, body: dict | None = None):
        super().__init__(message)
        self.status, self.body = status, body or {}


class APIValidationError(APIError):
    """422 / 413: the request was refused; str(e) names the field."""


class APIAuthError(APIError):
    """401: the server wants a token and got none or an unknown one; 403: not for this machine."""


class APIUnavailableError(APIError):
    """503: the server has no model loaded yet, or the worker is overloaded (then `retry_after` is set:
    seconds to wait before sending the request again)."""

    def __init__(self, message: str, status: int | None = None, body: dict | None = None,
                 retry_after: float | None = None):
        super().__init__(message, status, body)
        self.retry_after = retry_after


class APINotFoundError(APIError):
    """404: e.g. no stream session for that machine (never started, ended, or evicted)."""


class APIConnectionError(APIError):
    pass


class APITimeoutError(APIError):
    pass


def _retry_after(r: httpx.Response) -> float | None:
    """Seconds from a 503's Retry-After (an overloaded worker's), else None."""
    if r.status_code != 503:
        return None
    try:
        return max(float(r.headers.get("retry-after", "")), 0.0)
    except ValueError:
        return None


def _rows(a) -> list:
    return a.tolist() if hasattr(a, "tolist") else a


class GCodeAPIClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", timeout: float = 10.0, admin_token: str | None = None,
                 retries: int = 0, busy_retries: int = 0, stream_retries: int = 2, token: str | None = None,
                 verify: bool | str = True):
        self.base_url, self.admin_token = base_url.rstrip("/"), admin_token
        self.busy_retries, self.stream_retries = busy_retries, stream_retries
        if isinstance(verify, str):   # an https server's CA bundle (default: the system's)
            verify = ssl.create_default_context(cafile=verify)
        # retries connection failures only, never a request
        transport = httpx.HTTPTransport(retries=retries, verify=verify)
        token = token if token is not None else os.environ.get("GCODEFP_API_TOKEN") or None
        headers = {"authorization": f"Bearer {token}"} if token else None   # reload sends its own
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport, headers=headers)

    # ---- plumbing -------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kw) -> dict:
        for attempt in range(self.busy_retries + 1):
            try:
                r = self._http.request(method, path, **kw)
            except httpx.TimeoutException as exc:
                raise APITimeoutError(f"{method} {path}: timed out ({type(exc).__name__})") from exc
            except httpx.TransportError as exc:
                raise APIConnectionError(f"{method} {path}: cannot reach {self.base_url} ({exc})") from exc
            wait = _retry_after(r)
            if wait is None or attempt == self.busy_retries:
                break
            # an overloaded worker refused it unread: sending it again is safe. Up to half as long again
            # at random, so that the many clients one overload refused do not all come back at once.
            time.sleep(wait * (1 + 0.5 * random.random()))
        try:
            body = orjson.loads(r.content) if r.content else {}
        except orjson.JSONDecodeError:
            body = {"error": r.text[:200]}
        if r.status_code >= 400:
            msg = f"{method} {path}: HTTP {r.status_code}: {body.get('error', body)}"
            if r.status_code == 503:
                raise APIUnavailableError(msg, 503, body, _retry_after(r))
            cls = (APIValidationError if r.status_code in (413, 422) else
                   APIAuthError if r.status_code in (401, 403) else
                   APINotFoundError if r.status_code == 404 else APIError)
            raise cls(msg, r.status_code, body)
        return body

    def _post_json(self, path: str, doc: dict) -> dict:
        return self._request("POST", path, content=orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY),
                             headers={"content-type": "application/json"})

    @staticmethod
    def _sensor_data(continuous, categorical, columns) -> dict:
        if columns is not None:
            return {"columns": {k: _rows(v) for k, v in columns.items()}}
        if continuous is None:
            raise ValueError("give continuous (+ categorical) or columns")
        sd = {"continuous": _rows(continuous)}
        if categorical is not None:
            sd["categorical"] = _rows(categorical)
        return sd

    @staticmethod
    def _config(method, temperature, beam_width, max_length, seed) -> dict:
        cfg = {"method": method, "temperature": temperature, "beam_width": beam_width, "max_length": max_length,
               "seed": seed}
        return {k: v for k, v in cfg.items() if v is not None}

    @staticmethod
    def _binary(windows) -> bytes:
        """[(continuous W x F, categorical W x C), ...] -> float32 LE [N, W, F + C]."""
        out = bytearray()
        for cont, cat in windows:
            cont, cat = _rows(cont), _rows(cat) if cat is not None else None
            for i, row in enumerate(cont):
                vals = list(row) + (list(cat[i]) if cat is not None else [])
                out += struct.pack(f"<{len(vals)}f", *vals)
        return bytes(out)

    # ---- endpoints ------------------------------------------------------------------------
    def health_check(self) -> bool:
        return self._request("GET", "/health").get("status") == "ok"

    def ready(self) -> bool:
        try:
            return bool(self._request("GET", "/ready").get("ready"))
        except APIUnavailableError:
            return False

    def info(self) -> dict:
        return self._request("GET", "/info")

    def predict(self, continuous=None, categorical=None, *, columns: dict | None = None, return_fingerprint=False,
                method: str | None = None, temperature: float | None = None, beam_width: int | None = None,
                max_length: int | None = None, seed: int | None = None, binary: bool = False) -> dict:
        cfg = self._config(method, temperature, beam_width, max_length, seed)
        if binary:
            params = {**cfg, "return_fingerprint": str(return_fingerprint).lower()}
            return self._request("POST", "/predict", content=self._binary([(continuous, categorical)]),
                                 params=params, headers={"content-type": "application/octet-stream"})
        return self._post_json("/predict", {"sensor_data": self._sensor_data(continuous, categorical, columns),
                                            "return_fingerprint": return_fingerprint, "inference_config": cfg})

    def batch_predict(self, windows: list, *, return_fingerprint=False, method: str | None = None,
                      temperature: float | None = None, beam_width: int | None = None, max_length: int | None = None,
                      seed: int | None = None) -> list[dict]:
        """windows: [(continuous, categorical), ...] or [{"columns": {...}}, ...]; one server-side batch."""
        sds = [w if isinstance(w, dict) else self._sensor_data(w[0], w[1], None) for w in windows]
        doc = {"windows": sds, "return_fingerprint": return_fingerprint,
               "inference_config": self._config(method, temperature, beam_width, max_length, seed)}
        return self._post_json("/batch_predict", doc)["predictions"]

    def get_fingerprint(self, continuous=None, categorical=None, *, columns: dict | None = None) -> dict:
        return self._post_json("/fingerprint", {"sensor_data": self._sensor_data(continuous, categorical, columns)})

    # ---- streaming: one machine followed from its program start ---------------------------
    @staticmethod
    def _stream_path(machine_id: str) -> str:
        return "/stream/" + quote(str(machine_id), safe="")

    def stream(self, machine_id: str, continuous=None, categorical=None, *, columns: dict | None = None,
               start: bool = False, every: int | None = None, idempotency_key: str | None = None) -> dict:
        """Post a machine's next rows (n x F / n x C, or columns of n values), in order (from its program's
        start when the served package streams with the row-count clock); start=True begins a new run.
        every: a tracked machine's rows answered (the last row and every Nth before it; None: the
        server's GCODEFP_STREAM_EVERY, 1: every row). idempotency_key: this chunk's key (default: a new
        UUID); a lost answer is retried with it (stream_retries). -> the answers (a clock session: every window)."""
        doc = {"sensor_data": self._sensor_data(continuous, categorical, columns), "start": start}
        if every is not None:
            doc["every"] = every
        body = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)   # the same bytes on every try
        headers = {"content-type": "application/json", "idempotency-key": idempotency_key or uuid.uuid4().hex}
        for attempt in range(self.stream_retries + 1):
            try:
                return self._request("POST", self._stream_path(machine_id), content=body, headers=headers)
            except (APIConnectionError, APITimeoutError):
                if attempt == self.stream_retries:
                    raise
                # the server may be restarting a worker, or the network recovering; at a random point of
                # the interval, so that a fleet of monitors cut off together does not retry together
                time.sleep(0.1 * 2 ** attempt * (0.5 + random.random()))

    def stream_state(self, machine_id: str) -> dict:
        return self._request("GET", self._stream_path(machine_id))

    def end_stream(self, machine_id: str) -> dict:
        return self._request("DELETE", self._stream_path(machine_id))

    # ---- Open Inference Protocol (v2); tritonclient[http] speaks it too -------------------
    V2_MODEL = "gcodefp"

    def _v2_path(self, version: str | None, tail: str = "") -> str:
        base = f"/v2/models/{self.V2_MODEL}" + (f"/versions/{quote(version, safe='')}" if version else "")
        return base + tail

    def v2_ready(self, version: str | None = None) -> bool:
        try:
            return bool(self._request("GET", self._v2_path(version, "/ready")).get("ready"))
        except (APIUnavailableError, APINotFoundError):
            return False

    def v2_model_metadata(self, version: str | None = None) -> dict:
        return self._request("GET", self._v2_path(version))

    def v2_infer(self, continuous, categorical=None, *, version: str | None = None, binary: bool = False,
                 outputs: list[str] | None = None, **parameters) -> dict:
        """Windows [N, W, F] (+ [N, W, C]) -> {output name: list, one entry per window} (+ model_version).
        binary=True sends and receives raw tensors (the binary tensor data extension)."""
        import numpy as np  # only this call needs numpy

        tensors = [("continuous", np.asarray(continuous, dtype="<f4"))]
        if categorical is not None:
            tensors.append(("categorical", np.asarray(categorical, dtype="<f4")))
        header: dict = {"inputs": [], "parameters": {**parameters, "binary_data_output": binary}}
        if outputs:
            header["outputs"] = [{"name": n} for n in outputs]
        for name, arr in tensors:
            spec = {"name": name, "datatype": "FP32", "shape": list(arr.shape)}
            spec.update({"parameters": {"binary_data_size": arr.nbytes}} if binary else {"data": arr.ravel().tolist()})
            header["inputs"].append(spec)
        head = orjson.dumps(header)
        body = head + b"".join(arr.tobytes() for _, arr in tensors) if binary else head
        headers = {"content-type": "application/octet-stream" if binary else "application/json"}
        if binary:
            headers["inference-header-content-length"] = str(len(head))
        try:
            r = self._http.post(self._v2_path(version, "/infer"), content=body, headers=headers)
        except httpx.TimeoutException as exc:
            raise APITimeoutError(f"v2 infer: timed out ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise APIConnectionError(f"v2 infer: cannot reach {self.base_url} ({exc})") from exc
        n_json = int(r.headers.get("inference-header-content-length", len(r.content)))
        try:
            doc = orjson.loads(r.content[:n_json])
        except orjson.JSONDecodeError:
            doc = {"error": r.text[:200]}
        if r.status_code >= 400:
            msg = f"v2 infer: HTTP {r.status_code}: {doc.get('error', doc)}"
            if r.status_code == 503:
                raise APIUnavailableError(msg, 503, doc, _retry_after(r))
            cls = APIValidationError if r.status_code in (400, 413) else APINotFoundError if r.status_code == 404 else APIError
            raise cls(msg, r.status_code, doc)
        result, offset = {"model_version": doc["model_version"]}, n_json
        for out in doc["outputs"]:
            size = (out.get("parameters") or {}).get("binary_data_size")
            if size is None:
                values = out["data"]
            elif out["datatype"] == "BYTES":
                raw, values, pos = r.content[offset:offset + size], [], 0
                while pos < len(raw):
                    (n,), pos = struct.unpack_from("<I", raw, pos), pos + 4
                    values.append(raw[pos:pos + n].decode())
                    pos += n
            else:
                values = np.frombuffer(r.content[offset:offset + size], dtype="<f4").tolist()
            offset += size or 0
            if out["datatype"] != "BYTES" and len(out["shape"]) == 2:
                values = [values[i * out["shape"][1]:(i + 1) * out["shape"][1]] for i in range(out["shape"][0])]
            result[out["name"]] = values
        return result

    def reload(self, version: str | None = None) -> dict:
        if not self.admin_token:
            raise ValueError("reload needs admin_token")
        return self._request("POST", "/admin/reload", content=orjson.dumps({"version": version} if version else {}),
                             headers={"authorization": f"Bearer {self.admin_token}",
                                      "content-type": "application/json"})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "GCodeAPIClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
