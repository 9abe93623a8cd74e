"""Tests of the ModelInfer controller: planner units, properties and the operator on kmock."""
