"""Launch-time planning: the pipeline's flags, the model source and the checked, picklable `ExportPlan`."""
