"""From live objects to checkpoint bytes and back: capture, snapshot, background writer, reader."""
