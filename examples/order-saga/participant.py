#!/usr/bin/env python3
"""A participant service for sagaflow's example order saga: reserve stock, charge the card,
ship; each with its undo. Python's standard library only: this is what a backend writes to
let sagaflow drive its saga (docs/contract.md §8).

    SAGAFLOW_SECRET_SHOP=whsec_... python3 participant.py [PORT]

- Every request is checked against its Standard Webhooks signature (webhook-id,
  webhook-timestamp, webhook-signature) when SAGAFLOW_SECRET_SHOP is set: a request that does
  not verify gets 401, which sagaflow records as a permanent failure.
- The Idempotency-Key is the same for every attempt of a step's invoke (or compensation):
  a repeated attempt (a retry, or a call resent after sagaflow crashed) gets the first
  answer back and does nothing twice.
- An order with "card": "declined" is refused at the charge (422), so the saga compensates:
  the stock reserved before is released.
- An undo may come for a step whose outcome sagaflow does not know (its call timed out):
  it then carries "partial" instead of "output", and undoes whatever the order holds.
"""

import base64
import hashlib
import hmac
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SECRET = os.environ.get("SAGAFLOW_SECRET_SHOP", "")
KEY = base64.b64decode(SECRET.removeprefix("whsec_")) if SECRET else None
TOLERANCE_S = 300

answers = {}  # Idempotency-Key -> (status, body): what the first attempt answered
lock = threading.Lock()


def verified(headers, body):
    """Standard Webhooks: v1 = base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}"))."""
    msg_id = headers.get("webhook-id")
    timestamp = headers.get("webhook-timestamp")
    if not msg_id or not timestamp or abs(time.time() - int(timestamp)) > TOLERANCE_S:
        return False
    signed = f"{msg_id}.{timestamp}.".encode() + body
    expected = base64.b64encode(hmac.new(KEY, signed, hashlib.sha256).digest()).decode()
    return any(
        hmac.compare_digest(candidate.split(",", 1)[1], expected)
        for candidate in headers.get("webhook-signature", "").split()
        if candidate.startswith("v1,")
    )


def reserve(request, order):
    return 200, {"reservation": f"R-{order['id']}", "items": order.get("items", 1)}


def release(request, order):
    # Called with the step's "output", or with "partial" when the reserve may have happened
    # (it timed out, say): undo whatever this order holds, and accept that it holds nothing.
    done = request.get("output") or {}
    return 200, {"released": done.get("reservation", f"R-{order['id']}")}


def charge(request, order):
    if order.get("card") == "declined":
        return 422, {"error": {"code": "card_declined", "message": f"the card of order {order['id']} was declined"}}
    reservation = request["steps"]["reserve-stock"]["output"]["reservation"]
    return 200, {"charge": f"C-{order['id']}", "for": reservation}


def refund(request, order):
    done = request.get("output") or {}
    return 200, {"refunded": done.get("charge", f"C-{order['id']}")}


def ship(request, order):
    return 200, {"shipment": f"S-{order['id']}"}


ROUTES = {
    "/saga/stock/reserve": reserve,
    "/saga/stock/release": release,
    "/saga/payments/charge": charge,
    "/saga/payments/refund": refund,
    "/saga/shipments": ship,
}


class Participant(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if KEY is not None and not verified(self.headers, body):
            return self.answer(401, {"error": {"code": "bad_signature", "message": "the signature does not verify"}})
        route = ROUTES.get(self.path)
        if route is None:
            return self.answer(404, {"error": {"code": "no_route", "message": self.path}})
        key = self.headers.get("idempotency-key", "")
        with lock:
            if key in answers:
                return self.answer(*answers[key])
        request = json.loads(body)
        status, answer = route(request, request["input"]["order"])
        with lock:
            answers[key] = (status, answer)
        print(
            f"{self.headers.get('sagaflow-step')} {self.headers.get('sagaflow-phase')} "
            f"attempt {self.headers.get('sagaflow-attempt')} -> {status} {json.dumps(answer)}",
            flush=True,
        )
        self.answer(status, answer)

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 4000
    server = ThreadingHTTPServer(("127.0.0.1", port), Participant)
    print(f"participant listening on http://127.0.0.1:{port}/saga", flush=True)
    server.serve_forever()
