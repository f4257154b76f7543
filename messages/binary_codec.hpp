#pragma once
// A tiny length-prefixed binary encoding for records that only provisiond
// reads back (RocksDB values). JSON stays the format of everything external
// (APIs, events); internal records are read on every poll and written twice
// per registration, and nlohmann JSON cost ~100k instructions per record
// (callgrind, docs/performance.md) against ~1k for this.
//
// Layout: varint (LEB128) for unsigned, zigzag varint for signed, varint
// length + bytes for strings, one byte for bools and enums. Field order is
// the schema; a version byte up front lets it evolve. The reader never reads
// past the end: any overrun or trailing garbage makes ok() false.

#include <cstdint>
#include <string>
#include <string_view>

namespace prov::codec {

class writer {
public:
  explicit writer(std::size_t reserve = 256) { out_.reserve(reserve); }
  void u8(uint8_t v) { out_.push_back(static_cast<char>(v)); }
  void u64(uint64_t v) {
    while (v >= 0x80) {
      out_.push_back(static_cast<char>((v & 0x7f) | 0x80));
      v >>= 7;
    }
    out_.push_back(static_cast<char>(v));
  }
  void i64(int64_t v) {
    u64((static_cast<uint64_t>(v) << 1) ^ static_cast<uint64_t>(v >> 63));
  }
  void str(std::string_view s) {
    u64(s.size());
    out_.append(s.data(), s.size());
  }
  std::string take() { return std::move(out_); }

private:
  std::string out_;
};

class reader {
public:
  explicit reader(std::string_view in) : in_(in) {}
  uint8_t u8() {
    if (pos_ >= in_.size())
      return fail(), 0;
    return static_cast<uint8_t>(in_[pos_++]);
  }
  uint64_t u64() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (pos_ >= in_.size())
        return fail(), 0;
      auto b = static_cast<uint8_t>(in_[pos_++]);
      v |= static_cast<uint64_t>(b & 0x7f) << shift;
      if ((b & 0x80) == 0)
        return v;
    }
    return fail(), 0;
  }
  int64_t i64() {
    auto u = u64();
    return static_cast<int64_t>((u >> 1) ^ (~(u & 1) + 1));
  }
  void str(std::string& out) {
    auto n = u64();
    if (!ok_ || n > in_.size() - pos_)
      return fail();
    out.assign(in_.data() + pos_, n);
    pos_ += n;
  }
  /// True when every read was in bounds and the input is fully consumed.
  bool done() const { return ok_ && pos_ == in_.size(); }
  bool ok() const { return ok_; }

private:
  void fail() {
    ok_ = false;
    pos_ = in_.size();
  }
  std::string_view in_;
  std::size_t pos_ = 0;
  bool ok_ = true;
};

} // namespace prov::codec
