"""Host-level helpers that know nothing of networks or data: errors, atomic writes, signals, safe loading of
untrusted text, names, BLAS threads and memory limits. Every other part of cnncli may import them."""
