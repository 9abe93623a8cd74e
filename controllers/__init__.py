"""MatrixInfer controllers: the Kopf operator (`matrixinfer-controllers`).

`controllers.modelinfer` runs ModelInfers as InferGroups of role pods: a pure planner
(`controllers.modelinfer.planner`) and thin Kopf handlers (`controllers.modelinfer.handlers`).
"""
