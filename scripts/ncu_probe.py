"""A few launches of one op for Nsight Compute (run under ncu on the GPU machine):
    ncu --clock-control none -k regex:attn_fwd --launch-skip 2 --launch-count 1 python scripts/ncu_probe.py attn
(probes: attn and combine, the two kernels of the split-KV attention; gemm). The op runs 4 times with the pipeline's shapes (the expert's denoise-step attention, 50 queries x 8
heads over 627 keys, or its skinny FP8 GEMMs)."""

import sys

import torch

import flashrt_kernels as fk

what = sys.argv[1] if len(sys.argv) > 1 else "attn"
dev = "cuda"
if what in ("attn", "combine"):
    sq, sk, hq, d = 50, 627, 8, 256
    q = torch.randn(1, sq, hq, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, sk, 1, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, sk, 1, d, device=dev, dtype=torch.bfloat16)
    o = torch.empty_like(q)
    nl, no = fk.attention_splitkv_sizes(1, sq, hq, d)
    lse, acc = torch.empty(nl, device=dev), torch.empty(no, device=dev)
    for _ in range(4):
        fk.attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), batch=1, seqlen_q=sq, seqlen_k=sk,
                     num_heads_q=hq, num_heads_kv=1, head_dim=d, q_strides=(sq * hq * d, hq * d, d),
                     k_strides=(sk * d, d, d), v_strides=(sk * d, d, d), o_strides=(sq * hq * d, hq * d, d),
                     softmax_scale=d**-0.5, lse_accum=lse.data_ptr(), o_accum=acc.data_ptr(), num_splits=0,
                     stream=torch.cuda.current_stream().cuda_stream)
else:
    m, k_dim, n = 50, 1024, 4096
    x = torch.randn(m, k_dim, device=dev).to(torch.float8_e4m3fn)
    w = torch.randn(n, k_dim, device=dev).to(torch.float8_e4m3fn)
    y = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
    for _ in range(4):
        fk.skinny_gemm(x.data_ptr(), w.data_ptr(), y.data_ptr(), m, n, k_dim, dtype="fp8",
                       stream=torch.cuda.current_stream().cuda_stream)
torch.cuda.synchronize()
