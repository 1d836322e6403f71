"""An example reward server: any plugin function behind tempflow's remote-reward protocol.

Run a scorer in its own environment (its own Python, packages and GPU), then point tempflow at it:

    python examples/rewards/server.py --reward colorfulness:colorfulness --port 8765
    tempflow score --rollout r --reward judge --reward-url judge=http://127.0.0.1:8765/ --out s.parquet

The protocol (README, "Rewards"): POST JSON ``{"prompts": [...], "images": [base64 PNG, ...]}``,
answer ``{"scores": [...]}`` with one number per image, in order. This server needs only the
standard library, numpy and Pillow, so that it runs beside packages tempflow cannot import.
"""

from __future__ import annotations

import argparse
import base64
import importlib
import io
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np


def decode(text: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB"))


def make_handler(score):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            try:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                images = np.stack([decode(im) for im in request["images"]])
                scores = [float(s) for s in score(images, list(request["prompts"]))]
                status, body = 200, {"scores": scores}
            except Exception as err:  # the client shows the first line of a 4xx/5xx body
                status, body = 400 if isinstance(err, (KeyError, ValueError)) else 500, {"error": repr(err)}
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reward", required=True, help="module:function to serve (its folder on PYTHONPATH)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0: any free port (printed)")
    args = parser.parse_args()
    module, _, name = args.reward.partition(":")
    score = getattr(importlib.import_module(module), name)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(score))
    print(f"serving {args.reward} at http://{args.host}:{server.server_address[1]}/", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
