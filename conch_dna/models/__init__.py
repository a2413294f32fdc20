"""Models and what is made of them: loading, chats to tokens, tool calls, adapters and their versions,
the models on this machine, the real pair, and GGUF files."""
