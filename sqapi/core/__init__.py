"""sqapi's core: messages, the processor, plugin loading and the status model."""
