"""Step 9's server read with the official openai client, unchanged but for its base_url.

    python stream_server_llm.py                        # in one terminal
    python examples/openai_client.py                   # in another
"""

import sys

import requests
from openai import OpenAI

url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:5000"
# The API key is a step 3 token, minted as the README's curl command does.
minted = requests.post(f"{url}/generate_token", json={"user_id": "User1"}, timeout=10)
client = OpenAI(base_url=f"{url}/v1", api_key=minted.json()["access_token"])
stream = client.chat.completions.create(
    model="stand-in-1",
    messages=[{"role": "user", "content": "Why stream an answer?"}],
    stream=True,
)
controls = {code: f"\\x{code:02x}" for code in range(32) if code != 10}  # no ESC to the terminal
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content.translate(controls), end="", flush=True)
print()
