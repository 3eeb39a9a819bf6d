"""CodeUnlearn (Wu, Dossou, Liu 2024), the whole paper in the order a request uses it: the codebook and its
training, counting codes, selecting the enriched ones, the gate, the mask, the control sets, the method."""
