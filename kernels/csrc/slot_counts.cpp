// Slot access counting of one micro-batch on CPU, document granularity, in one pass:
// memlayers_cpu::count_document_slots_(counts, doc_freq, last_occurrence, indices, order, valid,
//                                      occurrence, stream), all in place.
//
// pretrain/slots/counters.py defines the counts: counts[s] += the valid token's reads of slot s;
// doc_freq[s] += 1 for each (slot, document occurrence) pair whose occurrence is not the one
// that last selected s in its stream; last_occurrence[stream, s] ends as the latest such
// occurrence. Its device path finds the distinct pairs by sorting all T x H x k (slot, unit)
// keys (plus a dozen gathers and scatters of that size): ~4% of a demo step on CPU. Walking
// the tokens in stream-major order and updating last_occurrence as it goes gives the same
// numbers, because a stream's occurrences never decrease along that order: a pair is seen
// again only within its own occurrence, and the first sight compares with the value before
// the micro-batch, as the sorted path does. One thread: the walk is sequential by definition.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>

namespace {

void count_document_slots_(at::Tensor& counts, at::Tensor& doc_freq, at::Tensor& last_occurrence,
                           const at::Tensor& indices, const at::Tensor& order, const at::Tensor& valid,
                           const at::Tensor& occurrence, const at::Tensor& stream) {
  const int64_t N = counts.numel();
  TORCH_CHECK(counts.dim() == 1 && doc_freq.sizes() == counts.sizes(), "count_document_slots_: counts and doc_freq must be (N,)");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&counts, &doc_freq, &last_occurrence, &indices, &order, &occurrence, &stream})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->device().is_cpu(),
                "count_document_slots_: every tensor but valid must be a contiguous int64 CPU tensor");
  TORCH_CHECK(last_occurrence.dim() == 2 && last_occurrence.size(1) == N + 1,
              "count_document_slots_: last_occurrence must be (streams, N + 1)");
  TORCH_CHECK(indices.dim() == 2, "count_document_slots_: indices must be (T, reads per token)");
  const int64_t T = indices.size(0), reads = indices.size(1), streams = last_occurrence.size(0);
  TORCH_CHECK(order.numel() == T && occurrence.numel() == T && stream.numel() == T && valid.numel() == T,
              "count_document_slots_: order, occurrence, stream and valid must hold one entry per token");
  TORCH_CHECK(valid.scalar_type() == at::kBool && valid.is_contiguous() && valid.device().is_cpu(),
              "count_document_slots_: valid must be a contiguous bool CPU tensor");
  int64_t* count = counts.mutable_data_ptr<int64_t>();
  int64_t* freq = doc_freq.mutable_data_ptr<int64_t>();
  int64_t* last = last_occurrence.mutable_data_ptr<int64_t>();
  const int64_t* slots = indices.const_data_ptr<int64_t>();
  const int64_t* token_at = order.const_data_ptr<int64_t>();
  const bool* is_valid = valid.const_data_ptr<bool>();
  const int64_t* occ = occurrence.const_data_ptr<int64_t>();
  const int64_t* stream_at = stream.const_data_ptr<int64_t>();
  for (int64_t p = 0; p < T; ++p) {  // stream-major positions
    const int64_t token = token_at[p];
    TORCH_CHECK(token >= 0 && token < T, "count_document_slots_: order must be a permutation of [0, T)");
    if (!is_valid[token]) continue;
    const int64_t s_id = stream_at[p], o = occ[p];
    TORCH_CHECK(s_id >= 0 && s_id < streams, "count_document_slots_: stream ids must lie in [0, ", streams, ")");
    int64_t* last_of_stream = last + s_id * (N + 1);
    const int64_t* row = slots + token * reads;
    for (int64_t j = 0; j < reads; ++j) {
      const int64_t slot = row[j];
      TORCH_CHECK(slot >= 0 && slot < N, "count_document_slots_: slot index ", slot, " outside [0, ", N, ")");
      ++count[slot];
      if (last_of_stream[slot] != o) {
        ++freq[slot];
        last_of_stream[slot] = o;
      }
    }
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(memlayers_cpu, m) {
  m.def(
      "count_document_slots_(Tensor(a!) counts, Tensor(b!) doc_freq, Tensor(c!) last_occurrence, Tensor indices, "
      "Tensor order, Tensor valid, Tensor occurrence, Tensor stream) -> ()");
}

TORCH_LIBRARY_IMPL(memlayers_cpu, CPU, m) {
  m.impl("count_document_slots_", &count_document_slots_);
}
