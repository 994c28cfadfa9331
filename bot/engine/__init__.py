"""The generation engine: the API both backends implement (`api`), chat templating within a token budget
(`templating`), and the backends: `local` (the model in this process) and `remote` (an OpenAI-compatible server)."""
