"""The local engine: the model in this process, on transformers' continuous batching. The only place that imports
torch and touches transformers' internals."""
