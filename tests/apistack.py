"""A real API process and a real worker sharing one project home, for the API tests."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import httpx

TOKENS = ("first-token-0123456789", "second-token-9876543210")


@dataclass
class ApiStack:
    """Where the API listens, the project home its processes share, and a valid token."""

    url: str
    home: Path
    token: str
    worker_pid: int
    logs: Path

    def client(self, token: str | None = None, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token or self.token}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kwargs)

    def tail(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(self.logs.glob("*.log"))
        )


def wait_for(stack: ApiStack, flow_id: str, states: set[str], seconds: float = 300) -> list[dict]:
    """Poll a run's status until it is in ``states``; return every status seen."""
    seen = []
    deadline = time.monotonic() + seconds
    with stack.client() as client:
        while True:
            answer = client.get(f"/workflows/flows/{flow_id}/status")
            assert answer.status_code == 200, answer.text
            seen.append(answer.json())
            if seen[-1]["status"] in states:
                return seen
            assert time.monotonic() < deadline, f"{seen[-1]}\n{stack.tail()}"
            time.sleep(0.2)
