"""The contract suite: the promises every adapter method keeps, parametrised over frontend
(linen, NNX) x layer kind x method (x quantized base and adapter set where the method supports
them). A new method adds one row to `contract.variants.VARIANTS`; a new layer kind one entry in
`contract.layers`."""
