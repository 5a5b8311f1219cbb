"""langchain-openai against `kvserve serve` on the default model: chat invoke and stream,
`with_structured_output` (a JSON schema through response_format), `bind_tools` (a clear 400),
and the completions model's `batch` (a list of prompts in one request).

langchain is not a kvserve dependency: run this with an environment that has it, e.g. the
lm-eval one the benchmark script makes (`.venv-lmeval/bin/pip install langchain-openai`):

    .venv-lmeval/bin/python scripts/langchain_check.py
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import httpx
from langchain_openai import ChatOpenAI, OpenAI
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parent.parent


class Person(BaseModel):
    name: str
    age: int
    role: Literal["admin", "user", "guest"]


def main() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [str(ROOT / ".venv/bin/python"), "-m", "kvserve", "serve", "--port", str(port),
               "--served-model-name", "smol", "--max-model-len", "1024"]  # fmt: skip
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}/v1"
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        chat = ChatOpenAI(model="smol", base_url=base, api_key="x", temperature=0, max_tokens=120)
        print("invoke:", chat.invoke("Say hello in five words.").content)
        print("stream:", "".join(str(c.content) for c in chat.stream("Count to five.")))
        print("structured:", chat.with_structured_output(Person).invoke("Invent a site user."))
        try:
            chat.bind_tools([Person]).invoke("hi")
        except Exception as error:  # the server's 400, as the openai client raises it
            print("bind_tools:", type(error).__name__, str(error)[:160])
        llm = OpenAI(model="smol", base_url=base, api_key="x", temperature=0, max_tokens=8)
        print("batch:", llm.batch(["The capital of France is", "1, 2, 3,"]))
    finally:
        server.terminate()
        server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
