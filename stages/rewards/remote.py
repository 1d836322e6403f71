"""A remote reward: a judge that runs in its own server (a VLM, an OCR model, anything), scored over HTTP.

The protocol, one request per batch of images:

    POST URL
    Content-Type: application/json
    {"prompts": ["a red circle", ...], "images": ["<base64 PNG>", ...]}

    200 OK
    {"scores": [0.73, ...]}

``scores`` holds one finite number per image, in the order sent. Connection failures, broken
answers, timeouts (the server silent for the timeout: urllib's limit holds for each read, not for the
whole answer) and answers 5xx or 429 are retried with exponential back-off, each wait at most
:data:`MAX_WAIT` seconds; any other status, a body that is not JSON, or JSON without N numbers under
``scores`` ends the stage with a line naming the server.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np

from stages.support.errors import TempflowError

# PIL is imported where images are encoded, for start-up time.

MAX_WAIT = 60.0
"""Seconds of the longest wait between two tries."""


def retried(status: int) -> bool:
    """A server error (5xx) or "too many requests" (429): worth another try."""
    return status >= 500 or status == 429


def encode_png(image: np.ndarray) -> str:
    """One uint8 ``(H, W, 3)`` image as base64 PNG text."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(text: str) -> np.ndarray:
    """The inverse of :func:`encode_png` (what a server in Python does with each image)."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB"))


class RemoteReward:
    """Scores batches by POSTing them to ``url``; a try fails when the server is silent for
    ``timeout`` seconds; ``retries`` more tries after the first, waiting ``backoff * 2**i`` seconds
    (at most :data:`MAX_WAIT`) before the i-th."""

    def __init__(self, name: str, url: str, timeout: float = 120.0, retries: int = 3, backoff: float = 1.0) -> None:
        self.name, self.url, self.timeout, self.retries, self.backoff = name, url, timeout, retries, backoff

    def __call__(self, images: np.ndarray, prompts: list[str]) -> list[float]:
        body = json.dumps({"prompts": list(prompts), "images": [encode_png(im) for im in images]}).encode()
        answer = self._post(body)
        return self._scores(answer, len(images))

    def _fail(self, what: str) -> TempflowError:
        return TempflowError(f"reward {self.name}: {self.url} {what}")

    def _post(self, body: bytes) -> bytes:
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(MAX_WAIT, self.backoff * 2 ** (attempt - 1)))
            request = urllib.request.Request(self.url, data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as err:
                detail = err.read(200).decode("utf-8", "replace").strip().splitlines()
                last = f"answered HTTP {err.code}{': ' + detail[0] if detail else ''}"
                if not retried(err.code):
                    raise self._fail(last) from None
            except (TimeoutError, socket.timeout):
                last = f"did not answer within {self.timeout:g} s"
            except http.client.HTTPException as err:  # a cut or malformed answer: IncompleteRead, BadStatusLine
                last = f"sent a broken answer ({type(err).__name__})"
            except (urllib.error.URLError, ConnectionError, OSError) as err:
                reason = getattr(err, "reason", err)
                if isinstance(reason, (TimeoutError, socket.timeout)):
                    last = f"did not answer within {self.timeout:g} s"
                else:
                    last = f"is down or unreachable ({reason})"
        tries = self.retries + 1
        raise self._fail(f"{last} ({tries} {'try' if tries == 1 else 'tries'})")

    def _scores(self, answer: bytes, count: int) -> list[float]:
        try:
            parsed: Any = json.loads(answer)
        except ValueError:
            shown = answer[:60].decode("utf-8", "replace")
            raise self._fail(f"answered with something that is not JSON: {shown!r}") from None
        scores = parsed.get("scores") if isinstance(parsed, dict) else None
        if not isinstance(scores, list) or len(scores) != count or not all(
                isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
            got = f"{len(scores)} entries" if isinstance(scores, list) else type(scores).__name__
            raise self._fail(f"answered JSON without {count} numbers under \"scores\" (got {got})")
        return [float(s) for s in scores]
