"""containerd's gRPC Content API over a store: ``server`` (``contentfs serve``) and
``client`` (``RemoteStore``, the store API over gRPC).

The store core never imports this package. Protobuf modules are generated from
``proto/*.proto`` at build time or on first import (see ``codegen``).
"""
