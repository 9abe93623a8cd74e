"""Status writers for the gateway's kinds (ModelRoute, ModelServer): the controllers are the only
writer of their status; the extproc and the xDS server only read."""
