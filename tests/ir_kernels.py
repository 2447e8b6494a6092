"""Small kernels that exercise what later ops need from the IR: loop-carried
online softmax, dot (flash attention), scans, sort/top-k, argmax, gathers
and a counter-based RNG built from integer ops."""
import kernelforge.lang as kl
from kernelforge.ir import lib


@kl.kernel(static=("N",))
def softmax_online(x: kl.In("M", "N"), out: kl.Out("M", "N")):
    m = kl.parallel("M")

    def stats(n, m_i, l_i):
        m_new, l_new, _, _ = lib.online_softmax_step(m_i, l_i, kl.load(x[m, n]).to(kl.f32), "N")
        return m_new, l_new

    m_i, l_i = kl.seq_for("N", stats, init=(kl.full(float("-inf"), kl.f32, "M"),
                                           kl.zeros(kl.f32, "M")))

    def write(n):
        s = kl.load(x[m, n]).to(kl.f32)
        kl.store(out[m, n], (kl.exp(s - m_i) / l_i).to(out.dtype))

    kl.seq_for("N", write)


@kl.kernel(static=("N",))
def softmax_online_base2(x: kl.In("M", "N"), out: kl.Out("M", "N"), scale: kl.f32):
    """softmax(x * scale) with the scale folded into exp2 (``log2_scale``),
    on blocks of rows launched last block first (``descending``)."""
    m = kl.parallel("M", block=4, descending=True)
    c = scale * lib.LOG2E

    def stats(n, m_i, l_i):
        m_new, l_new, _, _ = lib.online_softmax_step(m_i, l_i, kl.load(x[m, n]).to(kl.f32), "N",
                                                     log2_scale=c)
        return m_new, l_new

    m_i, l_i = kl.seq_for("N", stats, init=(kl.full(float("-inf"), kl.f32, "M"),
                                           kl.zeros(kl.f32, "M")))

    def write(n):
        s = kl.load(x[m, n]).to(kl.f32)
        kl.store(out[m, n], (kl.exp2(s * c - m_i * c) / l_i).to(out.dtype))

    kl.seq_for("N", write)


@kl.kernel(static=("D",))
def flash_attention(q: kl.In("M", "D"), k: kl.In("N", "D"), v: kl.In("N", "D"),
                    o: kl.Out("M", "D"), scale: kl.f32):
    m = kl.parallel("M", block=16)
    d = kl.tile("D")
    qt = kl.load(q[m, d]).to(kl.f32)

    def step(n, m_i, l_i, acc):
        s = kl.dot(qt, kl.load(k[n, d]).to(kl.f32), "D") * scale
        m_new, l_new, p, alpha = lib.online_softmax_step(m_i, l_i, s, "N")
        acc = acc * alpha + kl.dot(p, kl.load(v[n, d]).to(kl.f32), "N")
        return m_new, l_new, acc

    init = (kl.full(float("-inf"), kl.f32, "M"), kl.zeros(kl.f32, "M"),
            kl.zeros(kl.f32, "M", "D"))
    _, l_i, acc = kl.seq_for("N", step, init=init)
    kl.store(o[m, d], (acc / l_i).to(o.dtype))


@kl.kernel(static=("N",))
def cumsum_argmax(x: kl.In("M", "N"), cs: kl.Out("M", "N"), am: kl.Out("M"),
                  mx: kl.Out("M")):
    m, n = kl.parallel("M"), kl.tile("N")
    v = kl.load(x[m, n]).to(kl.f32)
    kl.store(cs[m, n], kl.cumsum(v, "N").to(cs.dtype))
    kl.store(am[m], kl.argmax(v, "N"))
    kl.store(mx[m], kl.max(v, "N").to(mx.dtype))


@kl.kernel(static=("N", "K"))
def sort_topk(x: kl.In("M", "N"), srt: kl.Out("M", "N"), top: kl.Out("M", "K")):
    m, n = kl.parallel("M"), kl.tile("N")
    v = kl.load(x[m, n])
    kl.store(srt[m, n], kl.sort(v, "N", descending=True))
    values, _ = kl.topk(v, "N", 4, "K")
    kl.store(top[m, kl.tile("K")], values)


@kl.kernel(static=("N",))
def gather_rows(table: kl.In("V", "N"), ids: kl.In("M"), out: kl.Out("M", "N")):
    m, n = kl.parallel("M"), kl.tile("N")
    row = kl.load(ids[m])                          # a gathered index
    kl.store(out[m, n], kl.load(table[row, n]))


@kl.kernel(static=("N",), derived={"H": lambda s: s["N"] // 2})
def rotate_halves(x: kl.In("M", "N"), out: kl.Out("M", "N")):
    """out = [x2, x1] for x = [x1, x2]: loads at an offset tile (RoPE's rotate-half)."""
    m = kl.parallel("M")

    def body(h):
        half = kl.size("N") // 2
        kl.store(out[m, h], kl.load(x[m, h + half]))
        kl.store(out[m, h + half], kl.load(x[m, h]))

    kl.seq_for("H", body)


@kl.kernel()
def philox(counter: kl.In("M"), seed: kl.In("S"), out: kl.Out("M", "W")):
    m = kl.parallel("M", block=32)
    c0 = kl.load(counter[m])
    k0, k1 = kl.load(seed[0]), kl.load(seed[1])
    zero = c0 * 0
    r = lib.philox4x32(c0, zero, zero, zero, k0, k1)
    for i, word in enumerate(r):
        kl.store(out[m, i], word)


@kl.kernel(static=("N",))
def round_trip(a: kl.In("M", "N"), b: kl.In("M", "N"), out: kl.Out("M", "N")):
    """An explicit rounding in the middle of f32 math must survive every lowering."""
    m, n = kl.parallel("M"), kl.tile("N")
    s = (kl.load(a[m, n]).to(kl.f32) + kl.load(b[m, n]).to(kl.f32)).to(kl.bf16).to(kl.f32)
    kl.store(out[m, n], s * 3.0)


@kl.kernel(static=("N",))
def store_then_reuse(x: kl.In("M", "N"), out: kl.Out("M", "N"), out2: kl.Out("M", "N")):
    """A loaded value used after a store that may overwrite its source (in place)."""
    m, n = kl.parallel("M"), kl.tile("N")
    v = kl.load(x[m, n])
    kl.store(out[m, n], v * 2.0)
    kl.store(out2[m, n], v + 1.0)


@kl.kernel(static=("N",))
def int_semantics(x: kl.In("M", "N"), seed: kl.u32, hashed: kl.Out("M", "N"),
                  flipped: kl.Out("M", "N"), wrapped: kl.Out("M", "N")):
    """u32 arithmetic, u32 scalar arguments past 2**31, and i32 wrap-around."""
    m, n = kl.parallel("M"), kl.tile("N")
    v = kl.load(x[m, n])
    kl.store(hashed[m, n], (v ^ (seed + 0x9E3779B9)) >> 16)
    kl.store(flipped[m, n], (~v) >> 28)
    kl.store(wrapped[m, n], n * 1000000000)


@kl.kernel(static=("N",))
def all_positive(x: kl.In("M", "N"), out: kl.Out("M")):
    m, n = kl.parallel("M"), kl.tile("N")
    kl.store(out[m], kl.min(kl.load(x[m, n]) > 0.0, "N"))


def make_scaler(c: float):
    """Kernels made by a factory share a name; each must keep its own constant."""
    @kl.kernel(static=("N",))
    def scale(x: kl.In("M", "N"), out: kl.Out("M", "N")):
        m, n = kl.parallel("M"), kl.tile("N")
        kl.store(out[m, n], kl.load(x[m, n]) * c)
    return scale


@kl.kernel(static=("N",))
def copy_rows(x: kl.In("M", "N"), out: kl.Out("M", "N")):
    m, n = kl.parallel("M"), kl.tile("N")
    kl.store(out[m, n], kl.load(x[m, n]))


@kl.kernel()
def ranged_sums(x: kl.In("M", "N"), lo: kl.In("M"), hi: kl.In("M"), out: kl.Out("M")):
    """out[m] = sum(x[m, lo[m]:hi[m]]): a loop with a range per row."""
    m = kl.parallel("M")

    def step(n, acc):
        return acc + kl.sum(kl.load(x[m, n]).to(kl.f32), "N")

    (s,) = kl.seq_for("N", step, init=(kl.zeros(kl.f32, "M"),), start=kl.load(lo[m]),
                      stop=kl.load(hi[m]))
    kl.store(out[m], s)


@kl.kernel()
def ranged_softmax_blocks(x: kl.In("M", "N"), hi: kl.In("M"), out: kl.Out("M", "N")):
    """Rows in blocks of 4 with different stops: a per-row online softmax over
    x[m, :hi[m]], written where n < hi[m] (a per-row mask inside one program)."""
    m = kl.parallel("M", block=4)
    stop = kl.load(hi[m])

    def stats(n, m_i, l_i):
        m_new, l_new, _, _ = lib.online_softmax_step(m_i, l_i, kl.load(x[m, n]), "N")
        return m_new, l_new

    m_i, l_i = kl.seq_for("N", stats, init=(kl.full(float("-inf"), kl.f32, "M"),
                                           kl.zeros(kl.f32, "M")), stop=stop)

    def write(n):
        kl.store(out[m, n], kl.exp(kl.load(x[m, n]) - m_i) / l_i)

    kl.seq_for("N", write, stop=stop)


@kl.kernel(static=("D",))
def scatter_rows(x: kl.In("T", "D"), slot: kl.In("T"), table: kl.Out("S", "D")):
    """table[slot[t]] = x[t] where slot[t] >= 0 (a masked scatter)."""
    t, d = kl.parallel("T"), kl.tile("D")
    s = kl.load(slot[t])
    kl.store(table[s, d], kl.load(x[t, d]), mask=s >= 0)


# q.k and p.v as sums of products (paged decode's form): block products in the
# C++ and Triton lowerings (tests/test_cpp_backend.py, tests/test_triton_dots.py)
@kl.kernel(static=("G", "N", "D"))
def contractions(q: kl.In("R", "G", "D"), k: kl.In("R", "N", "D"), v: kl.In("R", "N", "D"),
                 s: kl.Out("R", "G", "N"), o: kl.Out("R", "G", "D")):
    r = kl.parallel("R")
    g, n, d = kl.tile("G"), kl.tile("N"), kl.tile("D")
    qv = kl.load(q[r, g, d]).to(kl.f32)
    sc = kl.sum(qv * kl.load(k[r, n, d]).to(kl.f32), "D")       # q.k, k stored along D
    kl.store(s[r, g, n], sc)
    kl.store(o[r, g, d], kl.sum(sc * kl.load(v[r, n, d]).to(kl.f32), "N"))   # p.v


# rows gathered through a table inside a loop (paged attention's key and value
# reads, reduced to their access pattern): the C++ lowering prefetches the
# rows of both tables at the top of each chunk (tests/test_cpp_backend.py)
@kl.kernel(static=("D",))
def gathered_row_sums(idx: kl.In("R", "N"), a: kl.In("S", "D"), b: kl.In("S", "D"),
                      w: kl.In("D"), out: kl.Out("R", "D")):
    r, d = kl.parallel("R"), kl.tile("D")
    wv = kl.load(w[d]).to(kl.f32)

    def step(n, acc):
        rows = kl.load(idx[r, n])
        # a's rows feed a sum over D first; b's rows are read only after it
        score = kl.sum(kl.load(a[rows, d]).to(kl.f32) * wv, "D")
        return acc + kl.sum(score * kl.load(b[rows, d]).to(kl.f32), "N")

    (acc,) = kl.seq_for("N", step, init=(kl.zeros(kl.f32, "R", "D"),))
    kl.store(out[r, d], acc.to(out.dtype))
