"""A CrewAI crew whose agent answers with one Python program run by Codemode.

    .venv/bin/python examples/crewai_crew.py                 # offline: a scripted stand-in LLM
    CODEMODE_EXAMPLE_MODEL=openai/gpt-4o-mini .venv/bin/python examples/crewai_crew.py

With ``CODEMODE_EXAMPLE_MODEL`` set, a real model (``crewai.LLM``; its API key from the usual
environment variable) writes the program. Without it, a scripted LLM stands in, so the example
runs with no network: it writes the program a model would, then reports what it observed.
The executor is ``CODEMODE_EXECUTOR_URL`` when set, else one started in this process.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

os.environ.setdefault("CREWAI_DISABLE_TELEMETRY", "true")
os.environ.setdefault("OTEL_SDK_DISABLED", "true")
os.environ.setdefault("CREWAI_TRACING_ENABLED", "false")

from _executor import executor_config
from crewai import LLM, Agent, Crew, Task
from crewai.llms.base_llm import BaseLLM
from shop_tools import register

from codemode import Codemode

QUESTION = "What do customer c-1's open orders cost in total, in EUR?"

# What a model writes after reading the stubs: both calls, one program.
PROGRAM = """\
import asyncio
orders, rate = await asyncio.gather(
    tools.list_orders.run_async(status="open"),
    tools.exchange_rate.run_async(currency="EUR"),
)
cents = sum(o["total_cents"] for o in orders)
result = {"orders": [o["id"] for o in orders], "total_eur": round(cents / 100 * rate, 2)}
"""


class ScriptedLLM(BaseLLM):
    """Offline stand-in: acts with PROGRAM, then gives the observed result as its answer."""

    def call(self, messages: Any, *args: Any, **kwargs: Any) -> str:
        text = (
            messages
            if isinstance(messages, str)
            else "\n".join(str(m.get("content", "")) for m in messages)
        )
        if "result: {" not in text:
            action = json.dumps({"code": PROGRAM})
            return f"Thought: one program answers this.\nAction: codemode\nAction Input: {action}"
        observed = text[text.rindex("result: {") + len("result: ") :].splitlines()[0]
        return f"Thought: I have the numbers.\nFinal Answer: {observed}"

    async def acall(self, *args: Any, **kwargs: Any) -> str:
        return self.call(*args, **kwargs)

    def supports_function_calling(self) -> bool:
        return False


async def main() -> None:
    model = os.environ.get("CODEMODE_EXAMPLE_MODEL")
    llm: BaseLLM = LLM(model=model) if model else ScriptedLLM(model="scripted")
    async with executor_config() as config, Codemode.from_client_config(config) as codemode:
        register(codemode.registry)
        agent = Agent(
            role="Shop assistant",
            goal="Answer customers' questions about their orders exactly",
            backstory="You answer by writing one Python program against the shop's tools.",
            llm=llm,
            tools=[codemode.as_crewai_tool()],
        )
        task = Task(description=QUESTION, expected_output="A JSON object", agent=agent)
        with codemode.with_context(customer_id="c-1"):
            output = await Crew(agents=[agent], tasks=[task]).kickoff_async()
        print(output.raw)


if __name__ == "__main__":
    asyncio.run(main())
