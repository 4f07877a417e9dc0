"""The tools both tool-calling test modules ask for: a weather lookup and a drawing call,
with the schemas their calls must validate against."""

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city"],
        },
    },
}
DRAW = {
    "type": "function",
    "function": {
        "name": "draw_image",
        "description": "Draw a picture.",
        "parameters": {
            "type": "object",
            "properties": {
                "prompt": {"type": "string", "maxLength": 12},
                "steps": {"type": "integer", "minimum": 1, "maximum": 50},
            },
            "required": ["prompt", "steps"],
        },
    },
}
TOOLS = [WEATHER, DRAW]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
