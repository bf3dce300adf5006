"""Which streams share an engine call: the batcher, the runner, and the thread-to-loop channel."""
