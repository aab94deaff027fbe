"""Talk to a ComfyUI server: queue a prompt, follow it over the websocket, fetch its outputs."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

import aiohttp


class PromptRejected(Exception):
    """The server refused the prompt (validation); ``body`` is its JSON answer."""

    def __init__(self, body: dict):
        self.body = body
        super().__init__(describe_rejection(body))


class PromptFailed(Exception):
    """The prompt started but a node raised; the message names the node and the error."""


class ServerLost(PromptFailed):
    """The server went away (its websocket closed) before the prompt finished: run it elsewhere."""


def describe_rejection(body: dict) -> str:
    lines = [body.get("error", {}).get("message", "prompt rejected")]
    for node_id, errors in body.get("node_errors", {}).items():
        for e in errors.get("errors", []):
            lines.append(f"  node {node_id} ({errors.get('class_type')}): input "
                         f"'{e.get('extra_info', {}).get('input_name', '?')}': {e.get('message')}: {e.get('details')}")
    return "\n".join(lines)


@dataclass
class Result:
    prompt_id: str
    outputs: dict
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0


class Client:
    """One client id on one server (``http://host:port``)."""

    def __init__(self, url: str, timeout: float = 3600.0, on_event=None):
        """``on_event(kind, data)``, when given, sees each websocket event of the prompt (``progress``,
        ``executing``, ...) and the per-prompt log lines drop to DEBUG (the caller shows progress itself)."""
        self.url = url.rstrip("/")
        self.client_id = uuid.uuid4().hex
        self.timeout = timeout
        self.on_event = on_event

    async def _json(self, session: aiohttp.ClientSession, method: str, path: str, **kwargs):
        async with session.request(method, self.url + path, **kwargs) as r:
            body = await r.json(content_type=None)
            return r.status, body

    async def queue(self, session: aiohttp.ClientSession, prompt: dict) -> str:
        status, body = await self._json(session, "POST", "/prompt",
                                        json={"prompt": prompt, "client_id": self.client_id})
        if status != 200 or body.get("node_errors"):
            raise PromptRejected(body)
        return body["prompt_id"]

    async def _follow(self, ws: aiohttp.ClientWebSocketResponse, prompt_id: str, prompt: dict) -> None:
        """Log progress until the prompt finishes; raise PromptFailed when a node fails."""
        last = time.monotonic()
        level = logging.INFO if self.on_event is None else logging.DEBUG
        async for message in ws:
            if message.type == aiohttp.WSMsgType.BINARY:  # previews
                continue
            if message.type != aiohttp.WSMsgType.TEXT:
                raise ServerLost(f"the websocket closed before prompt {prompt_id} finished ({message.type})")
            event = message.json()
            kind, data = event.get("type"), event.get("data", {})
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            if self.on_event is not None:
                self.on_event(kind, data)
            if kind == "executing" and data.get("node") is not None:
                node, now = data["node"], time.monotonic()
                logging.log(level, "running node %s (%s) [+%.1f s]", node,
                            prompt.get(node, {}).get("class_type", "?"), now - last)
                last = now
            elif kind == "progress":
                logging.log(level, "  node %s: step %d/%d", data.get("node"), data["value"], data["max"])
            elif kind == "execution_error":
                raise PromptFailed(f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                                   f"{data.get('exception_type')}: {data.get('exception_message')}")
            elif kind == "execution_interrupted":
                raise PromptFailed(f"prompt {prompt_id} was interrupted")
            elif kind == "execution_success" or (kind == "executing" and data.get("node") is None
                                                 and data.get("prompt_id") == prompt_id):
                return
        raise ServerLost(f"the websocket closed before prompt {prompt_id} finished")

    def session(self) -> aiohttp.ClientSession:
        """A session for ``complete`` and ``download``; no total timeout (``complete`` has its own)."""
        return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=30))

    async def complete(self, session: aiohttp.ClientSession, prompt: dict) -> tuple[str, dict]:
        """Queue ``prompt`` and wait until it finishes: (its prompt id, its outputs by node id).

        Raises PromptRejected, PromptFailed (ServerLost when the server goes away) or, after
        ``timeout`` seconds, asyncio.TimeoutError."""
        async with session.ws_connect(f"{self.url}/ws?clientId={self.client_id}", heartbeat=30,
                                      max_msg_size=0) as ws:
            prompt_id = await self.queue(session, prompt)
            logging.log(logging.INFO if self.on_event is None else logging.DEBUG, "queued prompt %s", prompt_id)
            await asyncio.wait_for(self._follow(ws, prompt_id, prompt), self.timeout)
        entry = await self._history(session, prompt_id)
        status = entry.get("status", {})
        if status.get("status_str") == "error":
            raise PromptFailed(f"prompt {prompt_id} ended with an error: {status.get('messages')}")
        return prompt_id, entry.get("outputs", {})

    async def download(self, session: aiohttp.ClientSession, item: dict) -> bytes:
        """The bytes of one output file: an item of a node's output list (``filename``, ``subfolder``, ``type``)."""
        query = urlencode({"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                           "type": item.get("type", "output")})
        async with session.get(f"{self.url}/view?{query}") as r:
            r.raise_for_status()
            return await r.read()

    async def run(self, prompt: dict, out_dir: Path | None = None) -> Result:
        """Queue ``prompt``, wait for it, and save its images (and other files) into ``out_dir``."""
        started = time.monotonic()
        async with self.session() as session:
            result = Result(*await self.complete(session, prompt))
            if out_dir is not None:
                result.files = await self._save(session, result.outputs, Path(out_dir))
        result.seconds = time.monotonic() - started
        return result

    async def _history(self, session: aiohttp.ClientSession, prompt_id: str) -> dict:
        """The prompt's history entry; the server writes it just after it reports success, so wait for it."""
        deadline = time.monotonic() + 60
        while True:
            _, history = await self._json(session, "GET", f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry is not None and entry.get("status", {}).get("completed") is not None:
                return entry
            if time.monotonic() > deadline:
                raise PromptFailed(f"prompt {prompt_id} finished but has no history entry after 60 s")
            await asyncio.sleep(0.2)

    async def _save(self, session: aiohttp.ClientSession, outputs: dict, out_dir: Path) -> list[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        files = []
        for node_id, output in outputs.items():
            for kind, items in output.items():
                for item in items if isinstance(items, list) else []:
                    if not isinstance(item, dict) or "filename" not in item:
                        continue
                    path = out_dir / Path(item["filename"]).name
                    path.write_bytes(await self.download(session, item))
                    files.append(path)
                    logging.info("saved %s (node %s, %s)", path, node_id, kind)
        return files


def run_prompt(url: str, prompt: dict, out_dir: Path | None = None, timeout: float = 3600.0) -> Result:
    """Synchronous wrapper of ``Client.run``."""
    return asyncio.run(Client(url, timeout).run(prompt, out_dir))
