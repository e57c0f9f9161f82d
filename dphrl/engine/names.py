"""The engine names users type (`engine.name`, besides `auto`), each with its class's location.

A table that imports nothing, so the config can check a name without importing an engine.
"""

ENGINES: dict[str, str] = {
    "vllm": "dphrl.engine.vllm:VLLMEngine",
    "hf": "dphrl.engine.hf:HFEngine",
}
