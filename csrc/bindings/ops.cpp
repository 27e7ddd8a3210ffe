// ops.cpp - the op registry of torch_ops: every schema in one place, the argument checks (each
// naming the op, the argument and the value received), output allocation, and the dispatch to the
// C core (CPU, split across torch's threads) or to the CUDA wrappers (ops_cuda.cpp).
// The autograd and autocast kernels of w4a16_linear are here too; the fake (meta) kernels and its
// vmap rule are registered in Python (torch_ops/_ops.py).
#include <torch/extension.h>

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/FuncTorchTLS.h>
#include <ATen/functorch/BatchedTensorImpl.h>
#include <ATen/autocast_mode.h>
#include <c10/util/safe_numerics.h>

#include <atomic>
#include <mutex>
#include <algorithm>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "ops.h"

namespace torch_ops {

void check_status(int status, const char *op) {
    TORCH_CHECK(status == TOPS_OK, op, ": kernel failed: ", tops_status_name(status));
}

namespace {

// ---- argument checks ------------------------------------------------------------------------

std::string shape_str(at::IntArrayRef s) {
    std::string o = "[";
    for (size_t i = 0; i < s.size(); ++i) o += (i ? ", " : "") + std::to_string(s[i]);
    return o + "]";
}

// a dtype as Python prints it (torch.uint8), not as C++ does (Byte)
std::string dtype_name(at::ScalarType s) {
    return "torch." + std::string(c10::getDtypeNames(s).first);
}

// None passed for a required tensor through torch.ops.torch_ops.* (the Python functions refuse it
// first) arrives undefined: its dtype read "Unimplemented scalar type", its device "tensor does not
// have a device". Each tensor's first check below makes this one.
void check_defined(const char *op, const char *arg, const at::Tensor &t) {
    TORCH_CHECK_TYPE(t.defined(), op, ": ", arg, " must be a tensor, got None");
}

void check_dtype(const char *op, const char *arg, const at::Tensor &t, at::ScalarType want) {
    check_defined(op, arg, t);
    TORCH_CHECK_TYPE(t.scalar_type() == want, op, ": ", arg, " must be ", dtype_name(want), ", got ",
                     dtype_name(t.scalar_type()));
}

void check_float(const char *op, const char *arg, const at::Tensor &t) {
    check_defined(op, arg, t);
    auto s = t.scalar_type();
    TORCH_CHECK_TYPE(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, op, ": ", arg,
                     " must be float32, float16 or bfloat16, got ", dtype_name(s));
}

void check_ndim(const char *op, const char *arg, const at::Tensor &t, int64_t ndim) {
    TORCH_CHECK_VALUE(t.dim() == ndim, op, ": ", arg, " must be ", ndim, "-D, got shape ",
                      shape_str(t.sizes()));
}

void check_shape(const char *op, const char *arg, const at::Tensor &t, at::IntArrayRef want,
                 const char *formula) {
    TORCH_CHECK_VALUE(t.sizes() == want, op, ": ", arg, " must have shape ", formula, " = ",
                      shape_str(want), ", got ", shape_str(t.sizes()));
}

void check_device(const char *op, const char *arg, const at::Tensor &t, const at::Tensor &ref) {
    check_defined(op, arg, t);
    TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", arg, " is on ", t.device(),
                      " but the other inputs are on ", ref.device());
    TORCH_CHECK_VALUE(t.is_cpu() || t.is_cuda(), op, ": ", arg,
                      " must be a CPU or CUDA tensor, got ", t.device());
}

void check_bits(const char *op, int64_t bits, std::initializer_list<int64_t> allowed) {
    if (std::find(allowed.begin(), allowed.end(), bits) != allowed.end()) return;
    std::string list;
    for (auto b : allowed) list += (list.empty() ? "" : ", ") + std::to_string(b);
    TORCH_CHECK_VALUE(false, op, ": bits must be one of {", list, "}, got ", bits);
}

// dim wrapped into [0, ndim) (ndim >= 1), or an error naming the op and the tensor (c10's
// maybe_wrap_dim names neither)
int64_t wrap_dim(const char *op, const char *arg, int64_t dim, int64_t ndim) {
    TORCH_CHECK_INDEX(dim >= -ndim && dim < ndim, op, ": dim = ", dim, " is out of range for ",
                      arg, " of ", ndim, " dimensions (expected in [", -ndim, ", ", ndim - 1, "])");
    return dim < 0 ? dim + ndim : dim;
}

int parse_order(const char *op, c10::string_view order) {
    if (order == "sequential") return TOPS_ORDER_SEQUENTIAL;
    if (order == "awq") return TOPS_ORDER_AWQ;
    TORCH_CHECK_VALUE(false, op, ": order must be \"sequential\" or \"awq\", got \"",
                      std::string(order), "\"");
}

int parse_zero_format(const char *op, const char *arg, c10::string_view zf) {
    if (zf == "v1") return TOPS_ZEROS_V1;
    if (zf == "v2") return TOPS_ZEROS_V2;
    TORCH_CHECK_VALUE(false, op, ": ", arg, " must be \"v1\" or \"v2\", got \"", std::string(zf),
                      "\"");
}

int tops_dtype_of(at::ScalarType s) {
    return s == at::kHalf ? TOPS_F16 : s == at::kBFloat16 ? TOPS_BF16 : TOPS_F32;
}

// a * b for a size (a, b >= 0); where that overflows int64, an error naming it. A zero-size
// tensor's other dimensions are not bounded by memory, and a wrapped product gave a wrong shape.
int64_t size_mul(const char *op, const char *what, int64_t a, int64_t b) {
    int64_t r;
    TORCH_CHECK_VALUE(!c10::mul_overflows(a, b, &r), op, ": ", what, " = ", a, " * ", b,
                      " overflows int64");
    return r;
}

int64_t resolve_group_size(const char *op, int64_t group_size, int64_t K) {
    TORCH_CHECK_VALUE(group_size == -1 || group_size > 0, op,
                      ": group_size must be positive or -1 (one group), got ", group_size);
    TORCH_CHECK_VALUE(group_size > 0 || K > 0, op,
                      ": group_size = -1 (one group of all K rows) needs K > 0, got K = 0");
    return group_size == -1 ? K : group_size;
}

// Every value of `t` (uint8) below 2**bits; one reduction (and, on CUDA, one sync: these are
// load-time ops, and a silent wrong packing is worse). what: the values, as the message names them.
void check_value_range(const char *op, const char *what, const at::Tensor &t, int64_t bits) {
    if (t.numel() == 0 || bits >= 8) return;
    int64_t mx = t.max().item<int64_t>();
    TORCH_CHECK_VALUE(mx < (int64_t(1) << bits), op, ": ", what, " must be < 2**bits = ",
                      int64_t(1) << bits, ", got a value of ", mx);
}

// Whether an index tensor's values can be read here: not while a Python dispatch mode traces
// (torch.compile's fake tensors; the traced graph's own ops check them when it runs).
bool index_values_readable(const at::Tensor &idx) {
    return !idx.key_set().has(c10::DispatchKey::Python) &&
           !c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::Python);
}

void check_index_bounds(const char *op, const char *arg, int64_t lo, int64_t hi, int64_t limit,
                        const char *meaning) {
    TORCH_CHECK_VALUE(lo >= 0 && hi < limit, op, ": ", arg, " values must be in [0, ", limit, ") (",
                      meaning, "), got values in [", lo, ", ", hi, "]");
}

// Index entries (g_idx: groups, perm: positions in a row of x) in [0, limit). On CUDA this needs a
// sync, so an index tensor already seen unchanged (same address, dtype, size, strides, limit and
// version counter) is not checked again, and while a CUDA graph is being captured one not seen is
// checked by a device-side assert the graph replays (an eager warm-up checks it too). Each entry
// keeps a weak reference to its storage and matches only that storage: another tensor at a freed
// one's address is checked anew. (A strong reference kept every index seen alive, up to 4096 of
// them, after the caller dropped it: a deleted model's g_idx / perm, or the whole of a larger
// tensor an index was a view of; a weak one keeps only the StorageImpl's header, its data is
// freed.) One entry per act-order layer. Values that cannot be read (index_values_readable) are
// neither checked nor cached. A write the version counter does not see (through .data or numpy, or
// to an inference tensor) goes unnoticed on CUDA; on the CPU, where reading costs no sync, the
// range is read on every call.
// want_perm: also find out (once, cached alike) whether idx is a permutation of [0, limit);
// returns that, false where unknown (during capture of a tensor not seen before) or not asked.
bool check_index_range(const char *op, const char *arg, const at::Tensor &idx, int64_t limit,
                       const char *meaning, bool want_perm = false) {
    if (!index_values_readable(idx) || idx.numel() == 0) return false;
    struct Seen {
        c10::weak_intrusive_ptr<c10::StorageImpl> storage;  // (its header: compared, never read)
        at::ScalarType dtype;
        std::vector<int64_t> strides;
        int64_t numel, limit;
        uint32_t version;
        int is_perm;  // -1: not asked yet
    };
    static std::mutex mu;
    static std::unordered_map<const void *, Seen> seen;
    const void *key = idx.data_ptr();
    // an inference tensor (made under torch.inference_mode) has no version counter: writes to it
    // go unnoticed, as writes through .data do
    uint32_t version =
        idx.is_inference() ? 0 : idx.unsafeGetTensorImpl()->version_counter().current_version();
    bool seen_unchanged = false;
    int seen_perm = -1;  // what an unchanged entry knows of the permutation question
    {
        std::lock_guard<std::mutex> lock(mu);
        auto it = seen.find(key);
        // (the weak reference keeps the StorageImpl's header allocated, so an equal address is
        // this same, live, storage)
        if (it != seen.end() &&
            it->second.storage._unsafe_get_target() == idx.storage().unsafeGetStorageImpl() &&
            it->second.numel == idx.numel() && it->second.limit == limit &&
            it->second.version == version && it->second.dtype == idx.scalar_type() &&
            idx.strides().equals(it->second.strides)) {
            seen_unchanged = true;
            seen_perm = it->second.is_perm;
        }
    }
    const bool answered = seen_unchanged && (!want_perm || seen_perm >= 0);
    if (answered && idx.is_cuda()) return seen_perm == 1;
#ifdef TOPS_WITH_CUDA
    if (idx.is_cuda() && cuda::is_capturing(idx)) {
        // no sync while capturing: an index not seen before (no eager warm-up, or made inside
        // the captured region) is checked by the graph itself, a device-side assert on each
        // replay, where out-of-range values read past the kernels' tables without a word
        if (!seen_unchanged) {
            auto [lo, hi] = at::aminmax(idx);
            at::_assert_async(at::logical_and(lo.ge(0), hi.lt(limit)),
                              std::string(op) + ": " + arg + " values out of range (" + meaning +
                                  ") in a captured CUDA graph");
        }
        return false;
    }
#endif
    if (!seen_unchanged || !idx.is_cuda()) {
        auto [lo, hi] = at::aminmax(idx);  // (readable: checked on entry)
        check_index_bounds(op, arg, lo.item<int64_t>(), hi.item<int64_t>(), limit, meaning);
    }
    if (answered) return seen_perm == 1;
    int is_perm = -1;
    if (want_perm)
        is_perm = idx.numel() == limit &&
                  at::equal(std::get<0>(at::sort(idx.reshape({-1}))), at::arange(limit, idx.options()));
    std::lock_guard<std::mutex> lock(mu);
    if (seen.size() >= 4096) {  // a bound: entries of freed storages first, else all
        for (auto e = seen.begin(); e != seen.end();)
            e = e->second.storage.expired() ? seen.erase(e) : std::next(e);
        if (seen.size() >= 4096) seen.clear();
    }
    seen.insert_or_assign(key, Seen{idx.storage().getWeakStorageImpl(), idx.scalar_type(),
                                     idx.strides().vec(), idx.numel(), limit, version, is_perm});
    return is_perm == 1;
}

void check_g_idx_range(const char *op, const at::Tensor &g_idx, int64_t groups) {
    check_index_range(op, "g_idx", g_idx, groups, "one per group of scales");
}

// The tensor under torch.func's wrappers: vmap's BatchedTensor (whose value holds every sample),
// grad's / jvp's TensorWrapper and functionalize's. The TensorWrapper's header needs one torch's
// wheel does not ship (nlohmann/json): those two are peeled by torch's own Python binding.
at::Tensor unwrap_functorch(at::Tensor t) {
    for (;;) {
        if (auto *batched = at::functorch::maybeGetBatchedImpl(t)) {
            t = batched->value();
        } else if (t.key_set().has(c10::DispatchKey::FuncTorchGradWrapper) ||
                   t.key_set().has(c10::DispatchKey::Functionalize)) {
            py::gil_scoped_acquire gil;
            t = py::module_::import("torch._C._functorch").attr("get_unwrapped")(t).cast<at::Tensor>();
        } else {
            return t;
        }
    }
}

// The same check for w4a16_linear's composite route (torch.func transforms, forward-mode AD), on
// the tensor under the transforms' wrappers: a batched index (vmap around grad / jacfwd) cannot be
// read otherwise, and on CUDA an out-of-range entry reaching index_add was a device-side assert
// that left the process's CUDA context unusable. Read below the transforms' layers (vmap refused
// .item() on any tensor), and cached as a plain tensor is.
void check_index_range_in_transform(const char *op, const char *arg, const at::Tensor &idx,
                                    int64_t limit, const char *meaning) {
    // (values unreadable first: under torch.compile(dynamic=True) the wrapper's sizes are
    // symbolic, and numel() threw "Cannot call numel() on tensor with symbolic sizes/strides")
    if (!index_values_readable(idx)) return;
    const at::Tensor inner = unwrap_functorch(idx);
    if (!index_values_readable(inner) || inner.numel() == 0) return;
    c10::impl::ExcludeDispatchKeyGuard plain(c10::DispatchKeySet(
        {c10::DispatchKey::FuncTorchDynamicLayerFrontMode, c10::DispatchKey::FuncTorchDynamicLayerBackMode}));
    check_index_range(op, arg, inner, limit, meaning);
}

// Split [0, n) across torch's intra-op threads in chunks of at least `grain`; returns a failing
// chunk's status (the last stored; every kernel fails all its chunks for one reason).
template <typename F>
int run_cpu_status(int64_t n, int64_t grain, const F &f) {
    std::atomic<int> status{TOPS_OK};
    at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) {
        int s = f(b, e);
        if (s != TOPS_OK) status.store(s);
    });
    return status.load();
}

template <typename F>
void run_cpu(const char *op, int64_t n, int64_t grain, const F &f) {
    check_status(run_cpu_status(n, grain, f), op);
}

#ifndef TOPS_WITH_CUDA
[[noreturn]] void no_cuda(const char *op) {
    TORCH_CHECK(false, op, ": this build of torch_ops has no CUDA kernels (rebuild with nvcc and a "
                           "CUDA build of torch)");
}
#define TOPS_CUDA(op, call) no_cuda(op)
#else
#define TOPS_CUDA(op, call) call
#endif

// ---- pack / unpack ------------------------------------------------------------------------------

// arg: what names the word dtype in the op's signature (pack's dtype, unpack's packed.dtype)
int word_bytes_of(const char *op, const char *arg, at::ScalarType dtype) {
    TORCH_CHECK_TYPE(dtype == at::kInt || dtype == at::kByte, op, ": ", arg,
                     " must be torch.int32 or torch.uint8, got ", dtype_name(dtype));
    return dtype == at::kInt ? 4 : 1;
}

at::Tensor pack(const at::Tensor &values_in, int64_t bits, int64_t dim, c10::string_view order_s,
                c10::optional<at::ScalarType> dtype_opt) {
    const char *op = "pack";
    // (None is int32: the schema's default. A default of ScalarType int32 is held by the schema
    // as the int 3, which AOTInductor filled in for a call that omitted it, as torch.export's
    // programs do, and serialized as an int: loading the package raised "Expected extern kernel
    // torch_ops::pack to have serialized argument type as_scalar_type for argument 4 but got
    // as_int")
    const at::ScalarType dtype = dtype_opt.value_or(at::kInt);
    check_dtype(op, "values", values_in, at::kByte);
    check_device(op, "values", values_in, values_in);
    check_bits(op, bits, {1, 2, 3, 4, 8});
    TORCH_CHECK_VALUE(values_in.dim() >= 1, op, ": values must have at least 1 dimension");
    int wb = word_bytes_of(op, "dtype", dtype);
    int order = parse_order(op, order_s);
    TORCH_CHECK_VALUE(order == TOPS_ORDER_SEQUENTIAL || (bits == 4 && wb == 4), op,
                      ": order=\"awq\" needs bits=4 and dtype=torch.int32, got bits=", bits,
                      " and dtype=", dtype_name(dtype));
    dim = wrap_dim(op, "values", dim, values_in.dim());
    int64_t len = values_in.size(dim);
    int64_t group = tops_pack_group((int)bits, wb);
    TORCH_CHECK_VALUE(len % group == 0, op, ": values.shape[", dim, "] = ", len,
                      " must be a multiple of ", group, " (bits=", bits, " into ", dtype_name(dtype),
                      ")");
    at::Tensor values = values_in.contiguous();
    if (values.is_cuda()) check_value_range(op, "values", values, bits);  // the CPU core checks as it packs
    auto shape = values.sizes().vec();
    shape[dim] = len / group * (group * bits / (8 * wb));  // (len * bits could overflow)
    at::Tensor out = at::empty(shape, values.options().dtype(dtype));
    if (values.numel() == 0) return out.zero_();
    int64_t outer = c10::multiply_integers(values.sizes().begin(), values.sizes().begin() + dim);
    int64_t inner = c10::multiply_integers(values.sizes().begin() + dim + 1, values.sizes().end());
    if (values.is_cuda()) {
        TOPS_CUDA(op, cuda::pack(out, values, outer, len, inner, bits, wb, order));
    } else {
        int status = run_cpu_status(
            outer, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, len * inner)),
            [&](int64_t b, int64_t e) {
                return tops_pack(out.data_ptr(), values.data_ptr<uint8_t>(), outer, len, inner,
                                 (int)bits, wb, order, b, e);
            });
        if (status == TOPS_ERR_RANGE) check_value_range(op, "values", values, bits);
        check_status(status, op);
    }
    return out;
}

at::Tensor unpack(const at::Tensor &packed_in, int64_t bits, int64_t dim, c10::string_view order_s) {
    const char *op = "unpack";
    check_device(op, "packed", packed_in, packed_in);
    int wb = word_bytes_of(op, "packed.dtype", packed_in.scalar_type());
    check_bits(op, bits, {1, 2, 3, 4, 8});
    TORCH_CHECK_VALUE(packed_in.dim() >= 1, op, ": packed must have at least 1 dimension");
    int order = parse_order(op, order_s);
    TORCH_CHECK_VALUE(order == TOPS_ORDER_SEQUENTIAL || (bits == 4 && wb == 4), op,
                      ": order=\"awq\" needs bits=4 and int32 words, got bits=", bits,
                      " and packed.dtype=", dtype_name(packed_in.scalar_type()));
    dim = wrap_dim(op, "packed", dim, packed_in.dim());
    int64_t nwords = packed_in.size(dim);
    int64_t words_per_group = tops_pack_group((int)bits, wb) * bits / (8 * wb);
    TORCH_CHECK_VALUE(nwords % words_per_group == 0, op, ": packed.shape[", dim, "] = ", nwords,
                      " is not a whole number of groups: bits=", bits, " spans ", words_per_group,
                      " words per group, so it must be a multiple of ", words_per_group);
    at::Tensor packed = packed_in.contiguous();
    auto shape = packed.sizes().vec();
    shape[dim] = size_mul(op, "the unpacked length", nwords / words_per_group,
                          tops_pack_group((int)bits, wb));
    at::Tensor out = at::empty(shape, packed.options().dtype(at::kByte));
    if (out.numel() == 0) return out;
    int64_t outer = c10::multiply_integers(packed.sizes().begin(), packed.sizes().begin() + dim);
    int64_t inner = c10::multiply_integers(packed.sizes().begin() + dim + 1, packed.sizes().end());
    if (packed.is_cuda()) {
        TOPS_CUDA(op, cuda::unpack(out, packed, outer, nwords, inner, bits, wb, order));
    } else {
        run_cpu(op, outer, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, nwords * inner)),
                [&](int64_t b, int64_t e) {
                    return tops_unpack(out.data_ptr<uint8_t>(), packed.data_ptr(), outer, nwords,
                                       inner, (int)bits, wb, order, b, e);
                });
    }
    return out;
}

// ---- AWQ <-> GPTQ -------------------------------------------------------------------------------

// Checks shared by both repack directions: int32 2-D qweight and qzeros on one device.
int check_repack_inputs(const char *op, const at::Tensor &qweight, const at::Tensor &qzeros,
                        c10::string_view zero_format) {
    check_dtype(op, "qweight", qweight, at::kInt);
    check_dtype(op, "qzeros", qzeros, at::kInt);
    check_device(op, "qweight", qweight, qweight);
    check_device(op, "qzeros", qzeros, qweight);
    check_ndim(op, "qweight", qweight, 2);
    check_ndim(op, "qzeros", qzeros, 2);
    return parse_zero_format(op, "zero_format", zero_format);
}

// The bytes [first, last] a tensor's elements span (strides are never negative in torch).
std::pair<uintptr_t, uintptr_t> byte_span(const at::Tensor &t) {
    const uintptr_t first = reinterpret_cast<uintptr_t>(t.data_ptr());
    uintptr_t last = first + t.element_size() - 1;
    for (int64_t d = 0; d < t.dim(); ++d)
        last += static_cast<uintptr_t>((t.size(d) - 1) * t.stride(d)) * t.element_size();
    return {first, last};
}

// Whether some element of t has a byte in [lo, hi]: each element's offset, in index order
// (numel steps, on the host: only for a strided view whose span meets a dense tensor's)
bool has_element_in(const at::Tensor &t, uintptr_t lo, uintptr_t hi) {
    const uintptr_t base = reinterpret_cast<uintptr_t>(t.data_ptr());
    const auto es = static_cast<uintptr_t>(t.element_size());
    const int64_t nd = t.dim();
    std::vector<int64_t> idx(nd, 0);
    uintptr_t at_ = base;
    for (int64_t i = 0, n = t.numel(); i < n; ++i) {
        if (at_ <= hi && lo <= at_ + es - 1) return true;
        for (int64_t d = nd - 1; d >= 0; --d) {  // the next index, its offset kept as it moves
            at_ += static_cast<uintptr_t>(t.stride(d)) * es;
            if (++idx[d] < t.size(d)) break;
            at_ -= static_cast<uintptr_t>(t.stride(d) * t.size(d)) * es;
            idx[d] = 0;
        }
    }
    return false;
}

// Whether two tensors may share memory. get_overlap_status answers for dense tensors of one
// storage; it cannot tell for a strided view (TooHard), and it answers No for two storages, which
// may still hold one buffer (two torch.from_numpy of one array, from_blob, DLPack: a repack read
// words it had already overwritten). Then they may where the bytes they span meet (a strided view
// of one part of a buffer beside an out in another part of it is not refused); where one of them
// is contiguous (every byte of its span its own) and the other a strided view, they do where an
// element of the view lies in that span (an out in the gaps of an every-other-word view is not).
bool may_overlap(const at::Tensor &a, const at::Tensor &b) {
    if (a.numel() == 0 || b.numel() == 0) return false;
    const auto status = at::get_overlap_status(a, b);
    if (status == at::MemOverlapStatus::Full || status == at::MemOverlapStatus::Partial) return true;
    if (status == at::MemOverlapStatus::No && a.storage().is_alias_of(b.storage())) return false;
    const auto sa = byte_span(a), sb = byte_span(b);
    if (!(sa.first <= sb.second && sb.first <= sa.second)) return false;
    if (a.is_contiguous() != b.is_contiguous())
        return a.is_contiguous() ? has_element_in(b, sa.first, sa.second)
                                 : has_element_in(a, sb.first, sb.second);
    return true;
}

// out: the caller's output tensors (the .out overloads), or undefined to allocate them.
// A repack cannot run in place, so outputs may not overlap the inputs.
void check_out(const char *op, const char *arg, const at::Tensor &out, at::IntArrayRef shape,
               const at::Tensor &qweight, const at::Tensor &qzeros) {
    check_dtype(op, arg, out, at::kInt);
    check_device(op, arg, out, qweight);
    TORCH_CHECK_VALUE(out.sizes() == shape, op, ": ", arg, " must have the result's shape ",
                      shape_str(shape), ", got ", shape_str(out.sizes()));
    TORCH_CHECK_VALUE(out.is_contiguous(), op, ": ", arg, " must be contiguous");
    for (const at::Tensor *in : {&qweight, &qzeros})
        TORCH_CHECK_VALUE(!may_overlap(out, *in), op, ": ", arg,
                          " overlaps an input; a repack cannot run in place");
}

// The body of both directions: qweight in blocks of 8 rows of K (split across threads), qzeros
// word by word.
std::tuple<at::Tensor, at::Tensor> repack(const char *op, bool to_gptq, const at::Tensor &qweight_in,
                                          const at::Tensor &qzeros_in, int64_t K, int64_t N,
                                          int zf, const at::Tensor &qw_out = at::Tensor(),
                                          const at::Tensor &qz_out = at::Tensor()) {
    at::Tensor qweight = qweight_in.contiguous(), qzeros = qzeros_in.contiguous();
    std::vector<int64_t> qw_shape = to_gptq ? std::vector<int64_t>{K / 8, N}
                                            : std::vector<int64_t>{K, N / 8};
    at::Tensor qw, qz;
    if (qw_out.defined()) {
        check_out(op, "qweight_out", qw_out, qw_shape, qweight_in, qzeros_in);
        check_out(op, "qzeros_out", qz_out, qzeros.sizes(), qweight_in, qzeros_in);
        TORCH_CHECK_VALUE(!may_overlap(qw_out, qz_out), op, ": qweight_out and qzeros_out overlap");
        // Written in place: their version counters go up first, as an in-place aten op's do, so
        // a backward that saved one of them raises instead of reading the new words. An
        // inference tensor outside inference mode (no counter to bump) is refused first, both
        // checked before either is bumped (qweight_out's went up before qzeros_out was refused).
        for (auto [arg, out] : {std::pair<const char *, const at::Tensor *>{"qweight_out", &qw_out},
                                {"qzeros_out", &qz_out}})
            TORCH_CHECK_VALUE(!out->is_inference() || c10::InferenceMode::is_enabled(), op, ": ", arg,
                              " is an inference tensor: it can be written in place only inside "
                              "torch.inference_mode");
        qw_out.unsafeGetTensorImpl()->bump_version();
        qz_out.unsafeGetTensorImpl()->bump_version();
        qw = qw_out;
        qz = qz_out;
    } else {
        qw = at::empty(qw_shape, qweight.options());
        qz = at::empty_like(qzeros);
    }
    if (qweight.is_cuda()) {
        TOPS_CUDA(op, (to_gptq ? cuda::awq_to_gptq : cuda::gptq_to_awq)(qw, qz, qweight, qzeros, K,
                                                                         N, zf));
    } else {
        auto qweight_fn = to_gptq ? tops_awq_to_gptq_qweight : tops_gptq_to_awq_qweight;
        auto qzeros_fn = to_gptq ? tops_awq_to_gptq_qzeros : tops_gptq_to_awq_qzeros;
        if (qweight.numel() > 0)
            run_cpu(op, K / 8, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, N)),
                    [&](int64_t b, int64_t e) {
                        return qweight_fn(qw.data_ptr<int32_t>(), qweight.data_ptr<int32_t>(), K, N,
                                          b, e);
                    });
        if (qzeros.numel() > 0)  // (also where K = 0: qzeros may still hold a group)
            check_status(qzeros_fn(qz.data_ptr<int32_t>(), qzeros.data_ptr<int32_t>(),
                                   qzeros.numel(), zf),
                         op);
    }
    return {qw, qz};
}

std::tuple<at::Tensor, at::Tensor> awq_to_gptq_impl(const at::Tensor &qweight,
                                                    const at::Tensor &qzeros,
                                                    c10::string_view zero_format,
                                                    const at::Tensor &qw_out, const at::Tensor &qz_out) {
    const char *op = "awq_to_gptq";
    int zf = check_repack_inputs(op, qweight, qzeros, zero_format);
    int64_t K = qweight.size(0), G = qzeros.size(0);
    int64_t N = size_mul(op, "N = qweight.shape[1] * 8", qweight.size(1), 8);
    TORCH_CHECK_VALUE(K % 8 == 0, op, ": K = qweight.shape[0] = ", K,
                      " must be a multiple of 8 (GPTQ packs 8 rows per int32)");
    TORCH_CHECK_VALUE(G >= 1 && K % G == 0, op, ": qzeros.shape[0] = ", G,
                      " groups must divide K = qweight.shape[0] = ", K);
    check_shape(op, "qzeros", qzeros, {G, N / 8}, "[K/G, N/8]");
    return repack(op, true, qweight, qzeros, K, N, zf, qw_out, qz_out);
}

std::tuple<at::Tensor, at::Tensor> gptq_to_awq_impl(const at::Tensor &qweight,
                                                    const at::Tensor &qzeros,
                                                    c10::string_view zero_format,
                                                    const c10::optional<at::Tensor> &g_idx,
                                                    const at::Tensor &qw_out, const at::Tensor &qz_out) {
    const char *op = "gptq_to_awq";
    int zf = check_repack_inputs(op, qweight, qzeros, zero_format);
    int64_t K = size_mul(op, "K = qweight.shape[0] * 8", qweight.size(0), 8);
    int64_t N = qweight.size(1), G = qzeros.size(0);
    TORCH_CHECK_VALUE(N % 8 == 0, op, ": N = qweight.shape[1] = ", N,
                      " must be a multiple of 8 (AWQ packs 8 columns per int32)");
    TORCH_CHECK_VALUE(G >= 1 && K % G == 0, op, ": qzeros.shape[0] = ", G,
                      " groups must divide K = 8 * qweight.shape[0] = ", K);
    check_shape(op, "qzeros", qzeros, {G, N / 8}, "[K/G, N/8]");
    if (g_idx.has_value()) {
        TORCH_CHECK_TYPE(g_idx->scalar_type() == at::kInt || g_idx->scalar_type() == at::kLong, op,
                         ": g_idx must be int32 or int64, got ", dtype_name(g_idx->scalar_type()));
        check_device(op, "g_idx", *g_idx, qweight);
        check_shape(op, "g_idx", *g_idx, {K}, "[K]");
        at::Tensor got = g_idx->to(at::kLong);
        at::Tensor expected = at::arange(K, got.options()).div(K / G, "floor");
        if (!at::equal(got, expected)) {
            // (an error path: reading values here costs a sync on CUDA, once)
            TORCH_CHECK_VALUE(K < 2 || (got.slice(0, 1) >= got.slice(0, 0, K - 1)).all().item<bool>(),
                              op, ": g_idx is act-order (desc_act: rows are not grouped in order), "
                              "which AWQ cannot express; only g_idx == arange(K) // group_size converts");
            int64_t k = (got != expected).nonzero()[0][0].item<int64_t>();
            TORCH_CHECK_VALUE(false, op, ": g_idx is sorted but does not match qzeros' ", G,
                              " groups of K/G = ", K / G, " rows: g_idx[", k, "] = ",
                              got[k].item<int64_t>(), ", expected ", k / (K / G),
                              "; only g_idx == arange(K) // group_size converts");
        }
        // g_idx is an input too (repack's check_out sees qweight and qzeros only): an out in its
        // memory was written, the caller's g_idx changed by a call that only reads it
        if (qw_out.defined())
            for (auto [arg, out] : {std::pair<const char *, const at::Tensor *>{"qweight_out", &qw_out},
                                    {"qzeros_out", &qz_out}})
                TORCH_CHECK_VALUE(!may_overlap(*out, *g_idx), op, ": ", arg,
                                  " overlaps an input (g_idx); a repack cannot run in place");
    }
    return repack(op, false, qweight, qzeros, K, N, zf, qw_out, qz_out);
}

std::tuple<at::Tensor, at::Tensor> awq_to_gptq(const at::Tensor &qweight, const at::Tensor &qzeros,
                                               c10::string_view zero_format) {
    return awq_to_gptq_impl(qweight, qzeros, zero_format, at::Tensor(), at::Tensor());
}

std::tuple<at::Tensor, at::Tensor> gptq_to_awq(const at::Tensor &qweight, const at::Tensor &qzeros,
                                               c10::string_view zero_format,
                                               const c10::optional<at::Tensor> &g_idx) {
    return gptq_to_awq_impl(qweight, qzeros, zero_format, g_idx, at::Tensor(), at::Tensor());
}

// *_out ops (separate names: opcheck refuses ops with overloads): into the caller's tensors (no allocation: a loader converting layer after layer
// of one shape reuses them, and skips the page faults of fresh memory)
// None for an out (an undefined tensor) is refused: repack took it as "allocate", so the call
// wrote fresh tensors it then dropped, and the caller's out was left unwritten without an error
void check_outs_given(const char *op, const at::Tensor &qweight_out, const at::Tensor &qzeros_out) {
    TORCH_CHECK_VALUE(qweight_out.defined(), op, ": qweight_out must be a tensor, got None");
    TORCH_CHECK_VALUE(qzeros_out.defined(), op, ": qzeros_out must be a tensor, got None");
}

void awq_to_gptq_out(const at::Tensor &qweight, const at::Tensor &qzeros,
                     c10::string_view zero_format, at::Tensor &qweight_out, at::Tensor &qzeros_out) {
    check_outs_given("awq_to_gptq", qweight_out, qzeros_out);
    awq_to_gptq_impl(qweight, qzeros, zero_format, qweight_out, qzeros_out);
}

void gptq_to_awq_out(const at::Tensor &qweight, const at::Tensor &qzeros,
                     c10::string_view zero_format, const c10::optional<at::Tensor> &g_idx,
                     at::Tensor &qweight_out, at::Tensor &qzeros_out) {
    check_outs_given("gptq_to_awq", qweight_out, qzeros_out);
    gptq_to_awq_impl(qweight, qzeros, zero_format, g_idx, qweight_out, qzeros_out);
}

at::Tensor convert_gptq_zeros(const at::Tensor &qzeros_in, int64_t bits, c10::string_view src,
                              c10::string_view dst) {
    const char *op = "convert_gptq_zeros";
    check_dtype(op, "qzeros", qzeros_in, at::kInt);
    check_device(op, "qzeros", qzeros_in, qzeros_in);
    check_ndim(op, "qzeros", qzeros_in, 2);
    check_bits(op, bits, {2, 3, 4, 8});
    int s = parse_zero_format(op, "src", src), d = parse_zero_format(op, "dst", dst);
    at::Tensor qzeros = qzeros_in.contiguous();
    if (s == d) return qzeros.clone();
    at::Tensor out = at::empty_like(qzeros);
    if (qzeros.numel() == 0) return out;
    int delta = s == TOPS_ZEROS_V1 ? 1 : -1;
    if (qzeros.is_cuda()) {
        TOPS_CUDA(op, cuda::convert_gptq_zeros(out, qzeros, (int)bits, delta));
    } else {
        check_status(tops_convert_gptq_zeros(out.data_ptr<int32_t>(), qzeros.data_ptr<int32_t>(),
                                             qzeros.size(0), qzeros.size(1), (int)bits, delta),
                     op);
    }
    return out;
}

// ---- quanto pack_v2 -----------------------------------------------------------------------------

at::Tensor pack_v2(const at::Tensor &unpacked_in, bool check_range) {
    const char *op = "pack_v2";
    check_dtype(op, "unpacked", unpacked_in, at::kByte);
    check_device(op, "unpacked", unpacked_in, unpacked_in);
    check_ndim(op, "unpacked", unpacked_in, 2);
    int64_t N = unpacked_in.size(0), K = unpacked_in.size(1);
    TORCH_CHECK_VALUE(N % 4 == 0, op, ": N = unpacked.shape[0] = ", N, " must be a multiple of 4");
    TORCH_CHECK_VALUE(K % 64 == 0, op, ": K = unpacked.shape[1] = ", K,
                      " must be a multiple of 64");
    at::Tensor unpacked = unpacked_in.contiguous();
    at::Tensor out = at::empty({N / 4, K}, unpacked.options().dtype(at::kShort));
    if (out.numel() == 0) return out;
    if (unpacked.is_cuda()) {
        // the kernel flags values > 15 in the same pass; reading the flag is the one sync (about
        // 20 us on an H100, and no sync is allowed in CUDA graph capture): check_range=False
        // skips it for callers that know their values (unpack's output, say)
        at::Tensor out_of_range;
        if (check_range) out_of_range = at::zeros({1}, unpacked.options().dtype(at::kInt));
        TOPS_CUDA(op, cuda::pack_v2(out, unpacked, out_of_range));
        if (check_range && out_of_range.item<int32_t>() != 0)
            check_value_range(op, "unpacked values", unpacked, 4);
    } else {
        int status = run_cpu_status(N / 4, std::max<int64_t>(1, (1 << 16) / K),
                                    [&](int64_t b, int64_t e) {
                                        return tops_pack_v2(out.data_ptr<int16_t>(),
                                                            unpacked.data_ptr<uint8_t>(), N, K, b, e);
                                    });
        // the core flags values > 15 as it packs; find the value for the message only then
        if (status == TOPS_ERR_RANGE) check_value_range(op, "unpacked values", unpacked, 4);
        check_status(status, op);
    }
    return out;
}

at::Tensor unpack_v2(const at::Tensor &packed_in) {
    const char *op = "unpack_v2";
    check_dtype(op, "packed", packed_in, at::kShort);
    check_device(op, "packed", packed_in, packed_in);
    check_ndim(op, "packed", packed_in, 2);
    int64_t N = size_mul(op, "N = packed.shape[0] * 4", packed_in.size(0), 4), K = packed_in.size(1);
    TORCH_CHECK_VALUE(K % 64 == 0, op, ": K = packed.shape[1] = ", K, " must be a multiple of 64");
    at::Tensor packed = packed_in.contiguous();
    at::Tensor out = at::empty({N, K}, packed.options().dtype(at::kByte));
    if (out.numel() == 0) return out;
    if (packed.is_cuda()) {
        TOPS_CUDA(op, cuda::unpack_v2(out, packed));
    } else {
        run_cpu(op, N / 4, std::max<int64_t>(1, (1 << 16) / K), [&](int64_t b, int64_t e) {
            return tops_unpack_v2(out.data_ptr<uint8_t>(), packed.data_ptr<int16_t>(), N, K, b, e);
        });
    }
    return out;
}

// ---- k-interleaved qweight ----------------------------------------------------------------------

// The real k of each position of a k-interleaved row, as an index for x (CPU w4a16_linear reads
// the words as GPTQ ones on x in that order): built once per K (a model has a few), read-only
// after, shared by every call
at::Tensor kil_order(int64_t K) {
    static std::mutex mu;
    static std::unordered_map<int64_t, at::Tensor> cache;
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(K);
    if (it != cache.end()) return it->second;
    at::Tensor order = at::empty({K}, at::TensorOptions().dtype(at::kLong));
    int64_t *o = order.data_ptr<int64_t>();
    for (int64_t s = 0; s < K; ++s) o[s] = TOPS_KIL_REAL_K(s >> 3, s & 7);
    if (cache.size() >= 64) cache.clear();  // (a bound, for programs that see many sizes)
    cache.emplace(K, order);
    return order;
}

// GPTQ [K/8, N] -> [K/32, 4, N] (inverse: back); the layout is tops_prepack_w4a16's
at::Tensor prepack_w4a16_impl(const at::Tensor &qweight_in, bool inverse) {
    const char *op = inverse ? "unprepack_w4a16" : "prepack_w4a16";
    check_dtype(op, "qweight", qweight_in, at::kInt);
    check_device(op, "qweight", qweight_in, qweight_in);
    int64_t K, N;
    if (inverse) {
        check_ndim(op, "qweight", qweight_in, 3);
        TORCH_CHECK_VALUE(qweight_in.size(1) == 4, op, ": qweight must have shape [K/32, 4, N], got ",
                          shape_str(qweight_in.sizes()));
        K = size_mul(op, "K = qweight.shape[0] * 32", qweight_in.size(0), 32);
    } else {
        check_ndim(op, "qweight", qweight_in, 2);
        K = size_mul(op, "K = qweight.shape[0] * 8", qweight_in.size(0), 8);
        TORCH_CHECK_VALUE(K % 32 == 0, op, ": K = 8 * qweight.shape[0] = ", K,
                          " must be a multiple of 32 (the layout interleaves whole 32-k blocks)");
    }
    N = qweight_in.size(-1);
    at::Tensor qweight = qweight_in.contiguous();
    at::Tensor out = inverse ? at::empty({K / 8, N}, qweight.options())
                             : at::empty({K / 32, 4, N}, qweight.options());
    if (out.numel() == 0) return out;
    if (qweight.is_cuda()) {
        TOPS_CUDA(op, cuda::prepack_w4a16(out, qweight, inverse));
    } else {
        run_cpu(op, K / 32, std::max<int64_t>(1, (1 << 14) / N), [&](int64_t b, int64_t e) {
            return tops_prepack_w4a16(out.data_ptr<int32_t>(), qweight.data_ptr<int32_t>(), K, N,
                                      inverse ? 1 : 0, b, e);
        });
    }
    return out;
}
at::Tensor prepack_w4a16(const at::Tensor &qweight) { return prepack_w4a16_impl(qweight, false); }
at::Tensor unprepack_w4a16(const at::Tensor &qweight) { return prepack_w4a16_impl(qweight, true); }

// ---- dequantize ---------------------------------------------------------------------------------

// (a >= 0, b > 0; not (a + b - 1) / b, which overflowed for a group_size near INT64_MAX)
int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }

// ceil(count * bits / 32), the int32 words of count bits-bit fields, without forming count * bits
// (bits <= 8): it overflowed int64 for counts whose words fit, and a legal zero-size shape was
// refused as an overflow
int64_t packed_words(int64_t count, int64_t bits) {
    return count / 32 * bits + ceil_div(count % 32 * bits, 32);
}

// t [..., C] as [rows, C] (reshape({-1, C}) cannot infer the rows where C = 0). In sizes that may
// be symbolic: the backward's bias gradient traced through here under torch.compile(dynamic=True),
// and reading sizes() there specialised the batch and C, one graph per batch size
at::Tensor as_rows(const at::Tensor &t) {
    c10::SymInt rows = 1;
    for (int64_t d = 0; d + 1 < t.dim(); d++) rows *= t.sym_size(d);
    return t.reshape_symint({rows, t.sym_size(-1)});
}

at::Tensor dequantize(const at::Tensor &qweight_in, const at::Tensor &scales_in,
                      const c10::optional<at::Tensor> &qzeros_in, c10::string_view format_s,
                      int64_t bits, int64_t group_size, const c10::optional<at::Tensor> &g_idx_in,
                      c10::string_view zero_format) {
    const char *op = "dequantize";
    int format;
    if (format_s == "gptq")
        format = TOPS_FORMAT_GPTQ;
    else if (format_s == "awq")
        format = TOPS_FORMAT_AWQ;
    else
        TORCH_CHECK_VALUE(false, op, ": format must be \"gptq\" or \"awq\", got \"",
                          std::string(format_s), "\"");
    check_dtype(op, "qweight", qweight_in, at::kInt);
    check_float(op, "scales", scales_in);
    check_device(op, "qweight", qweight_in, qweight_in);
    check_device(op, "scales", scales_in, qweight_in);
    check_ndim(op, "qweight", qweight_in, 2);
    check_ndim(op, "scales", scales_in, 2);
    int zf = parse_zero_format(op, "zero_format", zero_format);
    int64_t G = scales_in.size(0), N = scales_in.size(1), K;
    if (format == TOPS_FORMAT_AWQ) {
        TORCH_CHECK_VALUE(bits == 4, op, ": format=\"awq\" is 4-bit only, got bits=", bits);
        TORCH_CHECK_VALUE(!g_idx_in.has_value(), op, ": format=\"awq\" takes no g_idx");
        K = qweight_in.size(0);
        // N first: with N = 12 a qweight of [K, 2] was blamed for not being [K, 1]
        TORCH_CHECK_VALUE(N % 8 == 0, op, ": N = scales.shape[1] = ", N,
                          " must be a multiple of 8 for AWQ");
        check_shape(op, "qweight", qweight_in, {K, N / 8}, "[K, N/8]");
    } else {
        check_bits(op, bits, {2, 3, 4, 8});
        TORCH_CHECK_VALUE(qweight_in.size(1) == N, op, ": qweight.shape[1] = ", qweight_in.size(1),
                          " must equal N = scales.shape[1] = ", N);
        int64_t rows = qweight_in.size(0);
        if (g_idx_in.has_value()) {
            check_device(op, "g_idx", *g_idx_in, qweight_in);
            check_ndim(op, "g_idx", *g_idx_in, 1);
            K = g_idx_in->size(0);
        } else {
            TORCH_CHECK_VALUE(bits != 3 || rows % 3 == 0, op, ": qweight.shape[0] = ", rows,
                              " is not a whole number of ", bits,
                              "-bit groups (bits=3 needs a multiple of 3 rows)");
            // rows * (32 / bits), or rows / 3 * 32: rows * 32 overflowed where K fits
            TORCH_CHECK_VALUE(!c10::mul_overflows(bits == 3 ? rows / 3 : rows,
                                                  int64_t(bits == 3 ? 32 : 32 / bits), &K),
                              op, ": K = qweight.shape[0] * 32 / bits = ", rows, " * 32 / ", bits,
                              " overflows int64");
        }
        const int64_t words = packed_words(K, bits);
        TORCH_CHECK_VALUE(rows == words, op, ": qweight must have shape ",
                          "[ceil(K*bits/32), N] = ", shape_str({words, N}),
                          " for K = ", K, ", got ", shape_str(qweight_in.sizes()));
    }
    int64_t gs = resolve_group_size(op, group_size, K);
    if (!(g_idx_in.has_value())) {
        TORCH_CHECK_VALUE(G == ceil_div(K, gs), op, ": scales must have shape [K/G, N] = ",
                          shape_str({ceil_div(K, gs), N}), " for K = ", K,
                          " and group_size = ", group_size, ", got ", shape_str(scales_in.sizes()));
    }
    at::Tensor qweight = qweight_in.contiguous(), scales = scales_in.contiguous();
    at::Tensor qzeros, g_idx;
    if (qzeros_in.has_value()) {
        check_dtype(op, "qzeros", *qzeros_in, at::kInt);
        check_device(op, "qzeros", *qzeros_in, qweight_in);
        int64_t zb = format == TOPS_FORMAT_AWQ ? 4 : bits;
        check_shape(op, "qzeros", *qzeros_in, {G, packed_words(N, zb)},
                    "[K/G, ceil(N*bits/32)]");
        qzeros = qzeros_in->contiguous();
    }
    if (g_idx_in.has_value()) {
        TORCH_CHECK_TYPE(g_idx_in->scalar_type() == at::kInt || g_idx_in->scalar_type() == at::kLong,
                         op, ": g_idx must be int32 or int64, got ", dtype_name(g_idx_in->scalar_type()));
        check_g_idx_range(op, *g_idx_in, G);  // the caller's tensor: a cache hit next time
        g_idx = g_idx_in->to(at::kInt).contiguous();
    }
    at::Tensor out = at::empty({N, K}, scales.options());
    if (out.numel() == 0) return out;
    tops_dequant_args a{};
    a.format = format;
    a.bits = (int)bits;
    a.K = K;
    a.N = N;
    a.groups = G;
    a.group_size = gs;
    a.qweight = qweight.data_ptr<int32_t>();
    a.qzeros = qzeros.defined() ? qzeros.data_ptr<int32_t>() : nullptr;
    a.zero_format = zf;
    a.scales = scales.data_ptr();
    a.scales_dtype = tops_dtype_of(scales.scalar_type());
    a.g_idx = g_idx.defined() ? g_idx.data_ptr<int32_t>() : nullptr;
    a.out = out.data_ptr();
    a.out_dtype = a.scales_dtype;
    if (qweight.is_cuda()) {
        TOPS_CUDA(op, cuda::dequantize(a, qweight));
    } else {
        run_cpu(op, N, std::max<int64_t>(1, (1 << 15) / K),
                [&](int64_t b, int64_t e) { return tops_dequantize(&a, b, e); });
    }
    return out;
}

// ---- w4a16 linear -------------------------------------------------------------------------------

// What w4a16_linear's arguments say once checked (each check names the op, the argument and the
// value): the sizes, the parsed zero format, and for perm whether it is known to be a permutation
// (asked only where want_perm; read by the CUDA route).
struct W4a16Shape {
    int64_t K, N, G, group_size;
    bool kil;  // qweight k-interleaved [K/32, 4, N] (prepack_w4a16)
    int zero_format;
    bool perm_is_permutation;
};

// The checks of w4a16_linear, shared by its kernels and its composite route (in_transform, below).
// They read sizes, dtypes and devices, and the values of g_idx and perm (cached per tensor).
W4a16Shape check_w4a16_linear(const at::Tensor &x, const at::Tensor &qweight, const at::Tensor &scales,
                              const c10::optional<at::Tensor> &qzeros, int64_t group_size,
                              const c10::optional<at::Tensor> &g_idx,
                              const c10::optional<at::Tensor> &bias, c10::string_view zero_format,
                              const c10::optional<at::Tensor> &perm, bool want_perm,
                              bool in_transform = false) {
    const char *op = "w4a16_linear";
    check_float(op, "x", x);
    check_dtype(op, "qweight", qweight, at::kInt);
    check_float(op, "scales", scales);
    check_device(op, "x", x, x);
    check_device(op, "qweight", qweight, x);
    check_device(op, "scales", scales, x);
    W4a16Shape w{};
    // qweight: GPTQ [K/8, N], or k-interleaved [K/32, 4, N] (prepack_w4a16)
    w.kil = qweight.dim() == 3;
    TORCH_CHECK_VALUE(qweight.dim() == 2 || (w.kil && qweight.size(1) == 4), op,
                      ": qweight must be [K/8, N] (GPTQ) or [K/32, 4, N] (prepack_w4a16), got shape ",
                      shape_str(qweight.sizes()));
    check_ndim(op, "scales", scales, 2);
    TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least 1 dimension");
    w.zero_format = parse_zero_format(op, "zero_format", zero_format);
    const int64_t K = size_mul(op, w.kil ? "K = qweight.shape[0] * 32" : "K = qweight.shape[0] * 8",
                               qweight.size(0), w.kil ? 32 : 8);
    const int64_t N = qweight.size(-1);
    TORCH_CHECK_VALUE(x.size(-1) == K, op, ": x.shape[-1] = ", x.size(-1), " must equal K = ",
                      w.kil ? "32 * qweight.shape[0] = " : "8 * qweight.shape[0] = ", K);
    TORCH_CHECK_VALUE(!w.kil || !g_idx.has_value(), op,
                      ": a k-interleaved qweight (prepack_w4a16) takes no g_idx (act-order weights: "
                      "act_order_prepack first, then perm)");
    TORCH_CHECK_VALUE(N % 8 == 0, op, ": N = qweight.shape[-1] = ", N, " must be a multiple of 8");
    const int64_t gs = resolve_group_size(op, group_size, K);
    // act-order (g_idx): the scales hold the groups g_idx names, any number of them, and K need
    // not be a multiple of group_size: a row-parallel shard of an act-order layer (its rows of
    // qweight and g_idx, the whole scales and qzeros: tensor-parallel loaders cannot split groups
    // scattered over K), as dequantize takes it
    const bool act = g_idx.has_value();
    TORCH_CHECK_VALUE(act || K % gs == 0, op, ": K = ", K, " must be a multiple of group_size = ", gs);
    const int64_t G = act ? scales.size(0) : K / gs;
    TORCH_CHECK_VALUE(!w.kil || gs % 32 == 0 || gs == K, op, ": group_size = ", gs,
                      " must be a multiple of 32 with a k-interleaved qweight (prepack_w4a16)");
    if (act)
        check_shape(op, "scales", scales, {G, N}, "[groups, N]");
    else
        check_shape(op, "scales", scales, {G, N}, "[K/group_size, N]");
    if (qzeros.has_value()) {
        check_dtype(op, "qzeros", *qzeros, at::kInt);
        check_device(op, "qzeros", *qzeros, x);
        check_shape(op, "qzeros", *qzeros, {G, N / 8}, act ? "[scales.shape[0], N/8]" : "[K/group_size, N/8]");
    }
    // g_idx and perm: int32 or int64 [K] on x's device
    auto check_index_arg = [&](const char *arg, const at::Tensor &t) {
        TORCH_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, ": ", arg,
                         " must be int32 or int64, got ", dtype_name(t.scalar_type()));
        check_device(op, arg, t, x);
        check_shape(op, arg, t, {K}, "[K]");
    };
    // (an argument rule, before g_idx's values are read: the fake kernel, which cannot read
    // them, refuses the pair in the same words)
    TORCH_CHECK_VALUE(!(g_idx.has_value() && perm.has_value()), op,
                      ": pass g_idx (act-order as stored) or perm (rows sorted by "
                      "act_order_prepack), not both");
    if (g_idx.has_value()) {
        check_index_arg("g_idx", *g_idx);
        if (in_transform)
            check_index_range_in_transform(op, "g_idx", *g_idx, G, "one per group of scales");
        else
            check_g_idx_range(op, *g_idx, G);  // the caller's tensor: a cache hit next time
    }
    if (perm.has_value()) {
        check_index_arg("perm", *perm);
        if (in_transform)
            check_index_range_in_transform(op, "perm", *perm, K, "positions in a row of x");
        else
            w.perm_is_permutation =
                check_index_range(op, "perm", *perm, K, "positions in a row of x", want_perm);
    }
    if (bias.has_value()) {
        check_float(op, "bias", *bias);
        check_device(op, "bias", *bias, x);
        check_shape(op, "bias", *bias, {N}, "[N]");
    }
    w.K = K;
    w.N = N;
    w.G = G;
    w.group_size = gs;
    return w;
}

at::Tensor w4a16_linear(const at::Tensor &x_in, const at::Tensor &qweight_in,
                        const at::Tensor &scales_in, const c10::optional<at::Tensor> &qzeros_in,
                        int64_t group_size, const c10::optional<at::Tensor> &g_idx_in,
                        const c10::optional<at::Tensor> &bias_in, c10::string_view zero_format,
                        const c10::optional<at::Tensor> &perm_in) {
    const char *op = "w4a16_linear";
    const bool on_cuda = x_in.is_cuda();
    // CUDA: a permutation lets the dense route move the weights instead of gathering x
    const W4a16Shape w = check_w4a16_linear(x_in, qweight_in, scales_in, qzeros_in, group_size,
                                            g_idx_in, bias_in, zero_format, perm_in, on_cuda);
    const int64_t K = w.K, N = w.N, G = w.G, gs = w.group_size;
    const bool kil = w.kil;
    const int zf = w.zero_format;
    auto xs = x_in.scalar_type();
    const int64_t M = c10::multiply_integers(x_in.sizes().begin(), x_in.sizes().end() - 1);
    auto out_shape = x_in.sizes().vec();
    out_shape.back() = N;
    // An empty result reads nothing: returned before the copies and the gather below (an
    // expanded x of many rows with N = 0, an expanded qweight with M = 0, or a k-interleaved
    // qweight of a large K with M = 0 allocated them: out of memory, where the fake gave the
    // empty result)
    if (M == 0 || N == 0) return at::empty(out_shape, x_in.options());
    at::Tensor qzeros, g_idx, bias, perm;
    if (qzeros_in.has_value()) qzeros = qzeros_in->contiguous();
    if (g_idx_in.has_value()) g_idx = g_idx_in->to(at::kInt).contiguous();
    if (perm_in.has_value()) {
        perm = perm_in->to(at::kInt).contiguous();
        // the CUDA kernels read perm in 16-byte words: a view at an odd offset gets a copy
        if (on_cuda && reinterpret_cast<uintptr_t>(perm.data_ptr()) % 16) perm = perm.clone();
    }
    if (bias_in.has_value()) bias = on_cuda ? bias_in->to(xs).contiguous() : bias_in->contiguous();
    // the CUDA kernels read scales in the activation dtype (a small [K/G, N] conversion)
    at::Tensor scales = on_cuda ? scales_in.to(xs).contiguous() : scales_in.contiguous();
    at::Tensor qweight = qweight_in.contiguous();
    at::Tensor x = as_rows(x_in);
    // CPU: x[:, perm] here (small next to the weights), and with a k-interleaved qweight x in
    // the words' k order, the words then read as GPTQ ones: one gather, x[:, perm[order]]. CUDA:
    // by a kernel of the launcher's (the kernels read the k-interleaved layout natively)
    if (!on_cuda && (perm.defined() || kil)) {
        at::Tensor idx = perm.defined() ? perm : kil_order(K);
        if (perm.defined() && kil) idx = perm.index_select(0, kil_order(K));
        x = x.index_select(1, idx);
    }
    // the C core reads rows x_row_stride >= K elements apart: an expanded x (stride 0, as a
    // broadcast gives) or overlapping rows get a copy
    if (x.size(0) > 0 && (x.stride(1) != 1 || (x.size(0) > 1 && x.stride(0) < K) || on_cuda))
        x = x.contiguous();
    at::Tensor out = at::empty({M, N}, x.options());
    if (K == 0) {
        out.zero_();
        if (bias.defined()) out.add_(bias.to(xs));
        return out.view(out_shape);
    }
    tops_w4a16_args a{};
    a.M = M;
    a.K = K;
    a.N = N;
    a.groups = G;
    a.group_size = gs;
    a.x = x.data_ptr();
    a.x_dtype = tops_dtype_of(xs);
    a.x_row_stride = M > 1 ? x.stride(0) : K;
    a.qweight = qweight.data_ptr<int32_t>();
    a.scales = scales.data_ptr();
    a.scales_dtype = tops_dtype_of(scales.scalar_type());
    a.qzeros = qzeros.defined() ? qzeros.data_ptr<int32_t>() : nullptr;
    a.zero_format = zf;
    a.g_idx = g_idx.defined() ? g_idx.data_ptr<int32_t>() : nullptr;
    a.bias = bias.defined() ? bias.data_ptr() : nullptr;
    a.bias_dtype = bias.defined() ? tops_dtype_of(bias.scalar_type()) : TOPS_F32;
    a.out = out.data_ptr();
    a.out_dtype = a.x_dtype;
    a.perm = nullptr; /* CPU: x is gathered above; CUDA: cuda::w4a16_linear takes perm */
    a.kinterleaved = kil && on_cuda ? 1 : 0; /* (CPU: x gathered above) */
    // a weight converted or copied above was written by the kernel just before the product's
    // (fp16 scales for bf16 x, an int64 g_idx or perm, a non-contiguous qweight): see the field
    auto made = [](const at::Tensor &t, const c10::optional<at::Tensor> &in) {
        return t.defined() && !t.is_same(*in);
    };
    a.weights_fresh = on_cuda && (!qweight.is_same(qweight_in) || !scales.is_same(scales_in) ||
                                  made(qzeros, qzeros_in) || made(g_idx, g_idx_in) ||
                                  made(perm, perm_in) || made(bias, bias_in));
    if (on_cuda) {
        TOPS_CUDA(op, cuda::w4a16_linear(a, x, out, bias, perm, w.perm_is_permutation));
    } else {
        // threads own whole column blocks of 8 (no reduction); at least 64 columns per chunk
        int64_t blocks = N / 8;
        int64_t threads = std::max<int64_t>(1, at::get_num_threads());
        int64_t grain = std::max<int64_t>(8, blocks / threads);
        run_cpu(op, blocks, grain, [&](int64_t b, int64_t e) {
            return tops_w4a16_linear(&a, b * 8, e * 8);
        });
    }
    return out.view(out_shape);
}

// ---- autograd of w4a16_linear -------------------------------------------------------------------
// d/dx of x @ W^T + bias is grad @ W, with W dequantised (in the gradient's dtype, from scales in
// that dtype: one rounding, as in the forward) and the x[..., perm] gather scattered back; bias
// gets grad summed over the batch; the weights get no gradient. In C++ rather than Python
// (torch.library.register_autograd): a Python autograd kernel runs on every call in grad mode,
// inference included, and cost 9 us of a 14 us call (CPU, M = 1, K = 128) against the CUDA
// kernels' 15 us at M = 1. The ops below are called through the dispatcher, so a traced backward
// (torch.compile) records them and fake tensors reach their fake kernels.

template <typename Fn>
c10::TypedOperatorHandle<Fn> find_op(const char *name) {
    return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

// W [N, K] in `dtype` (scales converted first: one rounding, as in the forward) from a GPTQ or
// k-interleaved qweight
at::Tensor dequantized_weight(const at::Tensor &qweight, const at::Tensor &scales,
                              const c10::optional<at::Tensor> &qzeros, int64_t group_size,
                              const c10::optional<at::Tensor> &g_idx, c10::string_view zero_format,
                              at::ScalarType dtype) {
    static const auto dequant = find_op<decltype(dequantize)>("torch_ops::dequantize");
    static const auto unprepack = find_op<decltype(unprepack_w4a16)>("torch_ops::unprepack_w4a16");
    return dequant.call(qweight.dim() == 3 ? unprepack.call(qweight) : qweight, scales.to(dtype),
                        qzeros, "gptq", 4, group_size, g_idx, zero_format);
}

class W4A16LinearGrad : public torch::autograd::Function<W4A16LinearGrad> {
public:
    static at::Tensor forward(torch::autograd::AutogradContext *ctx, const at::Tensor &x,
                              const at::Tensor &qweight, const at::Tensor &scales,
                              const c10::optional<at::Tensor> &qzeros, int64_t group_size,
                              const c10::optional<at::Tensor> &g_idx,
                              const c10::optional<at::Tensor> &bias, c10::string_view zero_format,
                              const c10::optional<at::Tensor> &perm) {
        static const auto op = find_op<decltype(w4a16_linear)>("torch_ops::w4a16_linear");
        at::Tensor out;
        {
            at::AutoDispatchBelowADInplaceOrView below;
            out = op.call(x, qweight, scales, qzeros, group_size, g_idx, bias, zero_format, perm);
        }
        ctx->save_for_backward({qweight, scales, qzeros.value_or(at::Tensor()),
                                g_idx.value_or(at::Tensor()), perm.value_or(at::Tensor())});
        ctx->saved_data["group_size"] = group_size;
        ctx->saved_data["zero_format"] = std::string(zero_format);
        ctx->saved_data["bias_grad"] = bias.has_value() && bias->defined() && bias->requires_grad();
        if (ctx->saved_data["bias_grad"].toBool())
            ctx->saved_data["bias_dtype"] = static_cast<int64_t>(bias->scalar_type());
        return out;
    }

    static torch::autograd::variable_list backward(torch::autograd::AutogradContext *ctx,
                                                   torch::autograd::variable_list grads) {
        const auto saved = ctx->get_saved_variables();
        const at::Tensor &grad = grads[0], &qzeros = saved[2], &g_idx = saved[3], &perm = saved[4];
        auto opt = [](const at::Tensor &t) {
            return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
        };
        at::Tensor grad_x, grad_bias;
        if (ctx->needs_input_grad(0)) { /* x is the first input edge */
            const at::Tensor w = dequantized_weight(
                saved[0], saved[1], opt(qzeros), ctx->saved_data["group_size"].toInt(), opt(g_idx),
                ctx->saved_data["zero_format"].toStringRef(), grad.scalar_type());
            grad_x = at::matmul(grad, w);
            if (perm.defined()) /* the product read x[..., perm]: scatter back, repeats adding up */
                grad_x = at::zeros_like(grad_x).index_add_(-1, perm.to(at::kLong), grad_x);
        }
        if (ctx->saved_data["bias_grad"].toBool()) {
            /* summed in fp32 (fp64 where either is double) and rounded once to bias's dtype: an
             * fp32 bias of a bf16 layer got its gradient rounded to bf16 (2e-3) on the way, and
             * sum(dtype=bf16) of an fp16 gradient rounds every element to bf16 first (as
             * Inductor's compiled backward does not) */
            const auto bias_dtype =
                static_cast<at::ScalarType>(ctx->saved_data["bias_dtype"].toInt());
            const auto acc = bias_dtype == at::kDouble || grad.scalar_type() == at::kDouble
                                 ? at::kDouble : at::kFloat;
            grad_bias = as_rows(grad).sum(0, false, acc).to(bias_dtype);
        }
        /* one per forward argument: x, qweight, scales, qzeros, group_size, g_idx, bias,
         * zero_format, perm */
        return {grad_x, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
                at::Tensor(), grad_bias, at::Tensor(), at::Tensor()};
    }
};

// torch.func's transforms (grad, vjp, jvp, and vmap around them) refuse a C++ autograd Function,
// and forward-mode AD (dual tensors) finds no formula for one. There the product is composed of
// differentiable ops instead, F.linear(x, W, bias) with W (and bias) in x's dtype and W's columns
// moved by perm (below), whose rules every transform knows; the weights stay constants. The same
// result up to rounding: W's, from scales rounded to x's dtype first, as the CUDA kernels and the
// backward do (the CPU kernel keeps fp32 weights: in bf16, ~2x its error against an fp64
// reference, within tolerance).
// Each transform then differentiates the composition, not the fused kernel; the usual call (no
// transform, no dual tensor) never comes here.
bool needs_composite(const at::Tensor &x, const at::Tensor &scales,
                     const c10::optional<at::Tensor> &bias) {
    // the Function's own test (it throws where a transform is active; the TLS exists once
    // torch.func has been used on this thread)
    if (const auto &functorch = at::functorch::functorchTLSAccessor()) {
        try {
            functorch->checkSupportsCppAutogradFunction();
        } catch (const c10::Error &) {
            return true;
        }
    }
    // (a dual scales too: the Function has no forward formula, and failed with torch's "jvp is
    // not implemented for the c++ API of custom Function"; the weights get no derivative, so its
    // tangent adds nothing there, as under torch.func.jvp)
    return x._fw_grad(/*level=*/0).defined() || scales._fw_grad(/*level=*/0).defined() ||
           (bias.has_value() && bias->_fw_grad(/*level=*/0).defined());
}

// check_w4a16_linear's rules where sizes are symbolic (torch.compile(dynamic=True) tracing a
// transform): dtypes, devices, ranks and the argument rules as they are, sizes as guards (symbol
// against symbol; expect_true). What dequantize and index_add check after (the weights' shapes,
// group_size, g_idx's and perm's values) is left to them; the rest nothing after would catch: a
// [1] bias broadcast by linear, a float perm cast to int64, g_idx with perm.
void check_w4a16_linear_symbolic(const at::Tensor &x, const at::Tensor &qweight,
                                 const at::Tensor &scales, const c10::optional<at::Tensor> &qzeros,
                                 int64_t group_size, const c10::optional<at::Tensor> &g_idx,
                                 const c10::optional<at::Tensor> &bias, c10::string_view zero_format,
                                 const c10::optional<at::Tensor> &perm) {
    const char *op = "w4a16_linear";
    auto holds = [](const c10::SymBool &b) { return b.expect_true(__FILE__, __LINE__); };
    check_float(op, "x", x);
    check_dtype(op, "qweight", qweight, at::kInt);
    check_float(op, "scales", scales);
    check_device(op, "qweight", qweight, x);
    check_device(op, "scales", scales, x);
    const bool kil = qweight.dim() == 3;
    TORCH_CHECK_VALUE((qweight.dim() == 2 || (kil && holds(qweight.sym_size(1).sym_eq(4)))), op,
                      ": qweight must be [K/8, N] (GPTQ) or [K/32, 4, N] (prepack_w4a16), got shape ",
                      qweight.sym_sizes());
    check_ndim(op, "scales", scales, 2);
    TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least 1 dimension");
    parse_zero_format(op, "zero_format", zero_format);
    // (where linear's own check named neither the op nor K: "a and b must have same reduction dim")
    const c10::SymInt K = qweight.sym_size(0) * (kil ? 32 : 8), N = qweight.sym_size(-1);
    TORCH_CHECK_VALUE(holds(x.sym_size(-1).sym_eq(K)), op, ": x.shape[-1] = ", x.sym_size(-1),
                      " must equal K = ", kil ? "32" : "8", " * qweight.shape[0] = ", K);
    TORCH_CHECK_VALUE(!kil || !g_idx.has_value(), op,
                      ": a k-interleaved qweight (prepack_w4a16) takes no g_idx (act-order weights: "
                      "act_order_prepack first, then perm)");
    TORCH_CHECK_VALUE(holds((N % 8).sym_eq(0)), op, ": N = qweight.shape[-1] = ", N,
                      " must be a multiple of 8");
    // (K is a multiple of 32 there: group_size = K is one)
    TORCH_CHECK_VALUE(!kil || group_size == -1 || (group_size > 0 && group_size % 32 == 0), op,
                      ": group_size = ", group_size,
                      " must be a multiple of 32 with a k-interleaved qweight (prepack_w4a16)");
    if (qzeros.has_value()) {
        check_dtype(op, "qzeros", *qzeros, at::kInt);
        check_device(op, "qzeros", *qzeros, x);
    }
    TORCH_CHECK_VALUE(!(g_idx.has_value() && perm.has_value()), op,
                      ": pass g_idx (act-order as stored) or perm (rows sorted by "
                      "act_order_prepack), not both");
    for (auto [arg, t] : {std::pair<const char *, const c10::optional<at::Tensor> *>{"g_idx", &g_idx},
                          {"perm", &perm}}) {
        if (!t->has_value()) continue;
        const at::Tensor &idx = **t;
        TORCH_CHECK_TYPE(idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong, op, ": ",
                         arg, " must be int32 or int64, got ", dtype_name(idx.scalar_type()));
        check_device(op, arg, idx, x);
        check_ndim(op, arg, idx, 1);
        TORCH_CHECK_VALUE(holds(idx.sym_size(0).sym_eq(K)), op, ": ", arg,
                          " must have shape [K] = [", K, "], got ", idx.sym_sizes());
    }
    if (bias.has_value()) {
        check_float(op, "bias", *bias);
        check_device(op, "bias", *bias, x);
        check_ndim(op, "bias", *bias, 1);
        TORCH_CHECK_VALUE(holds(bias->sym_size(0).sym_eq(N)), op, ": bias must have shape [N] = [",
                          N, "], got ", bias->sym_sizes());
    }
}

at::Tensor w4a16_linear_composite(const at::Tensor &x, const at::Tensor &qweight,
                                  const at::Tensor &scales, const c10::optional<at::Tensor> &qzeros,
                                  int64_t group_size, const c10::optional<at::Tensor> &g_idx,
                                  const c10::optional<at::Tensor> &bias,
                                  c10::string_view zero_format, const c10::optional<at::Tensor> &perm) {
    // Sizes are symbolic only while torch.compile(dynamic=True) traces the transform, and reading
    // them as integers failed (torch 2.11: an internal assert on the functorch wrapper; 2.13 read
    // them): there the checks compare symbols (check_w4a16_linear_symbolic).
    auto symbolic = [](const at::Tensor &t) {
        return t.unsafeGetTensorImpl()->has_symbolic_sizes_strides();
    };
    auto symbolic_opt = [&](const c10::optional<at::Tensor> &t) {
        return t.has_value() && t->defined() && symbolic(*t);
    };
    if (!(symbolic(x) || symbolic(qweight) || symbolic(scales) || symbolic_opt(qzeros) ||
          symbolic_opt(g_idx) || symbolic_opt(bias) || symbolic_opt(perm))) {
        check_w4a16_linear(x, qweight, scales, qzeros, group_size, g_idx, bias, zero_format, perm,
                           false, /*in_transform=*/true);
    } else {
        check_w4a16_linear_symbolic(x, qweight, scales, qzeros, group_size, g_idx, bias,
                                    zero_format, perm);
    }
    // (scales detached: the weights get no derivative, and dequantize would give them one)
    at::Tensor w = dequantized_weight(qweight, scales.detach(), qzeros, group_size, g_idx,
                                      zero_format, x.scalar_type());
    // x[..., perm] @ W^T as x @ W'^T, W'[:, j] the sum of W's columns k with perm[k] = j (a column
    // of W moved, for a permutation): the transforms then differentiate no gather of x, whose
    // index_select backward torch 2.11 failed on under torch.compile(dynamic=True) ("Expected
    // IntList but got GenericList", H100 image) and torch 2.13's Inductor got wrong under jacrev
    if (perm.has_value()) w = at::zeros_like(w).index_add(1, perm->to(at::kLong), w);
    c10::optional<at::Tensor> b;
    if (bias.has_value()) b = bias->to(x.scalar_type());
    return at::linear(x, w, b);
}

at::Tensor w4a16_linear_autograd(const at::Tensor &x, const at::Tensor &qweight,
                                 const at::Tensor &scales, const c10::optional<at::Tensor> &qzeros,
                                 int64_t group_size, const c10::optional<at::Tensor> &g_idx,
                                 const c10::optional<at::Tensor> &bias, c10::string_view zero_format,
                                 const c10::optional<at::Tensor> &perm) {
    // (the first kernel a call meets: needs_composite read an undefined x's device)
    check_defined("w4a16_linear", "x", x);
    check_defined("w4a16_linear", "qweight", qweight);
    check_defined("w4a16_linear", "scales", scales);
    if (needs_composite(x, scales, bias))
        return w4a16_linear_composite(x, qweight, scales, qzeros, group_size, g_idx, bias,
                                      zero_format, perm);
    // Nothing to differentiate (inference, no_grad): straight to the kernel. The Function's
    // context and saved values cost ~1 us of a 6 us call on the host (this VM, M = 1, K = N =
    // 64). Any input that requires grad (scales too, which gets none) keeps the Function, so
    // the output requires grad exactly where it did.
    auto req = [](const c10::optional<at::Tensor> &t) {
        return t.has_value() && t->defined() && t->requires_grad();
    };
    if (!at::GradMode::is_enabled() ||
        !(x.requires_grad() || qweight.requires_grad() || scales.requires_grad() || req(qzeros) ||
          req(g_idx) || req(bias) || req(perm))) {
        static const auto op = find_op<decltype(w4a16_linear)>("torch_ops::w4a16_linear");
        at::AutoDispatchBelowADInplaceOrView below;
        return op.call(x, qweight, scales, qzeros, group_size, g_idx, bias, zero_format, perm);
    }
    return W4A16LinearGrad::apply(x, qweight, scales, qzeros, group_size, g_idx, bias, zero_format,
                                  perm);
}

// ---- autocast of w4a16_linear -------------------------------------------------------------------
// Under torch.autocast the op does what F.linear does there (it is on autocast's lower-precision
// list): x is cast to the autocast dtype, so the fp32 activations of a mixed-precision model take
// the fp16 / bf16 kernels and the output comes in that dtype. The weights and bias stay as given
// (the op reads any float scales and bias, and adds the bias in fp32).
template <c10::DeviceType device>
at::Tensor w4a16_linear_autocast(const at::Tensor &x, const at::Tensor &qweight,
                                 const at::Tensor &scales, const c10::optional<at::Tensor> &qzeros,
                                 int64_t group_size, const c10::optional<at::Tensor> &g_idx,
                                 const c10::optional<at::Tensor> &bias, c10::string_view zero_format,
                                 const c10::optional<at::Tensor> &perm) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(
        at::autocast::get_autocast_dispatch_key_from_device_type(device));
    static const auto op = find_op<decltype(w4a16_linear)>("torch_ops::w4a16_linear");
    return op.call(at::autocast::cached_cast(at::autocast::get_autocast_dtype(device), x, device),
                   qweight, scales, qzeros, group_size, g_idx, bias, zero_format, perm);
}

}  // namespace

TORCH_LIBRARY(torch_ops, m) {
    m.def("pack(Tensor values, int bits, int dim=-1, str order=\"sequential\", "
          "ScalarType? dtype=None) -> Tensor");
    m.def("unpack(Tensor packed, int bits, int dim=-1, str order=\"sequential\") -> Tensor");
    m.def("awq_to_gptq(Tensor qweight, Tensor qzeros, str zero_format=\"v1\") -> (Tensor, Tensor)");
    m.def("awq_to_gptq_out(Tensor qweight, Tensor qzeros, str zero_format=\"v1\", *, "
          "Tensor(a!) qweight_out, Tensor(b!) qzeros_out) -> ()");
    m.def("gptq_to_awq_out(Tensor qweight, Tensor qzeros, str zero_format=\"v1\", "
          "Tensor? g_idx=None, *, Tensor(a!) qweight_out, Tensor(b!) qzeros_out) -> ()");
    m.def("gptq_to_awq(Tensor qweight, Tensor qzeros, str zero_format=\"v1\", "
          "Tensor? g_idx=None) -> (Tensor, Tensor)");
    m.def("convert_gptq_zeros(Tensor qzeros, int bits, str src, str dst) -> Tensor");
    m.def("pack_v2(Tensor unpacked, bool check_range=True) -> Tensor");
    m.def("unpack_v2(Tensor packed) -> Tensor");
    m.def("dequantize(Tensor qweight, Tensor scales, Tensor? qzeros=None, str format=\"gptq\", "
          "int bits=4, int group_size=128, Tensor? g_idx=None, str zero_format=\"v1\") -> Tensor");
    m.def("prepack_w4a16(Tensor qweight) -> Tensor");
    m.def("unprepack_w4a16(Tensor qweight) -> Tensor");
    m.def("w4a16_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? qzeros=None, "
          "int group_size=128, Tensor? g_idx=None, Tensor? bias=None, "
          "str zero_format=\"v1\", Tensor? perm=None) -> Tensor");
}

// The same functions serve both devices: they check, allocate, then call the C core or the CUDA
// wrappers by the tensors' device.
#define TOPS_IMPLS(m)                                    \
    m.impl("pack", &pack);                               \
    m.impl("unpack", &unpack);                           \
    m.impl("awq_to_gptq", &awq_to_gptq);                 \
    m.impl("gptq_to_awq", &gptq_to_awq);                 \
    m.impl("awq_to_gptq_out", &awq_to_gptq_out);         \
    m.impl("gptq_to_awq_out", &gptq_to_awq_out);         \
    m.impl("convert_gptq_zeros", &convert_gptq_zeros);   \
    m.impl("pack_v2", &pack_v2);                         \
    m.impl("unpack_v2", &unpack_v2);                     \
    m.impl("dequantize", &dequantize);                   \
    m.impl("prepack_w4a16", &prepack_w4a16);             \
    m.impl("unprepack_w4a16", &unprepack_w4a16);         \
    m.impl("w4a16_linear", &w4a16_linear)

TORCH_LIBRARY_IMPL(torch_ops, CPU, m) { TOPS_IMPLS(m); }
TORCH_LIBRARY_IMPL(torch_ops, Autograd, m) { m.impl("w4a16_linear", &w4a16_linear_autograd); }
TORCH_LIBRARY_IMPL(torch_ops, AutocastCPU, m) {
    m.impl("w4a16_linear", &w4a16_linear_autocast<c10::DeviceType::CPU>);
}
TORCH_LIBRARY_IMPL(torch_ops, AutocastCUDA, m) {
    m.impl("w4a16_linear", &w4a16_linear_autocast<c10::DeviceType::CUDA>);
}
#ifdef TOPS_WITH_CUDA
TORCH_LIBRARY_IMPL(torch_ops, CUDA, m) { TOPS_IMPLS(m); }
#endif

}  // namespace torch_ops

#ifdef TOPS_WITH_CUDA
// development hooks of csrc/cuda/w4a16_dense.cu and w4a16_kernels.cu (not in tops_cuda.h)
extern "C" void tops_cuda_w4a16_dev_dense(int mode);
extern "C" void tops_cuda_w4a16_dev_dense_scratch(int64_t bytes);
extern "C" void tops_cuda_w4a16_dev_global_split(int on);
extern "C" int tops_cuda_w4a16_dev_last_workspace(void);
extern "C" void tops_cuda_w4a16_dev_gather(int mode);
extern "C" void tops_cuda_w4a16_dev_last(int *cfg, int *split);
#endif

PYBIND11_MODULE(_C, m) {
    m.doc() = "torch_ops kernels; the ops themselves are torch.ops.torch_ops.*";
    m.def("cpu_isa", &tops_cpu_isa, "instruction set in use: 0 scalar, 1 AVX2, 2 AVX-512");
    m.def("cpu_isa_detected", &tops_cpu_isa_detected, "best instruction set of this CPU");
    m.def("cpu_isa_set", &tops_cpu_isa_set, "use at most this level (-1: the detected one)");
    m.def("w4a16_amx_set", &tops_w4a16_amx_set,
          "AMX tiles for bf16 x off (0), on where available (1), as detected (-1); returns the choice in force");
#ifdef TOPS_WITH_CUDA
    m.attr("with_cuda") = true;
    m.def("cuda_w4a16_dense", &tops_cuda_w4a16_dev_dense,
          "CUDA w4a16_linear's dense route (dequantise + cuBLAS): -1 automatic, 0 never, 1 "
          "always; for tests and benchmarks");
    m.def("cuda_w4a16_dense_scratch", &tops_cuda_w4a16_dev_dense_scratch,
          "CUDA w4a16_linear's dense route: bound on a dequantised column chunk in bytes (<= 0: the "
          "default, 64 MiB); for benchmarks");
    m.def("cuda_w4a16_global_split", &tops_cuda_w4a16_dev_global_split,
          "CUDA w4a16_linear, M <= 64 on sm_90: split K through the workspace where it pays (1, the "
          "default) or through thread-block clusters only (0); for tests and benchmarks");
    m.def("cuda_w4a16_gather_mode", &tops_cuda_w4a16_dev_gather,
          "CUDA w4a16_linear with perm: how x[:, perm] is gathered (0 automatic, 1 by element, 2 by "
          "element signalling the GEMM late, 3 by row, 4 by the GEMM's own grid, 5 by each of its blocks, "
          "where they can); for "
          "tests and benchmarks");
    m.def("cuda_w4a16_last_workspace", &tops_cuda_w4a16_dev_last_workspace,
          "CUDA w4a16_linear: bit 0 set when the last call split K through the workspace, bit 1 "
          "when its GEMM's grid gathered x[:, perm] itself, bit 2 when each of its blocks did; for tests");
    m.def(
        "cuda_w4a16_last_config",
        [] {
            int cfg = -1, split = 0;
            tops_cuda_w4a16_dev_last(&cfg, &split);
            return std::make_pair(cfg, split);
        },
        "CUDA w4a16_linear: (tile configuration, K split) of the last fused call (-1: the generic "
        "kernel); for tests");
#else
    m.attr("with_cuda") = false;
#endif
}
