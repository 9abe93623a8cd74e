"""The autoscaler: a pure planner (:mod:`.planner`), metric sources (:mod:`.sources`) and the
Kopf handlers that actuate ModelInfer replicas (:mod:`.handlers`)."""
