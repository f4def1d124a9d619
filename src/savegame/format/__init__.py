"""The on-disk format: manifest, exact value codec, tensor files. See docs/format.md."""
