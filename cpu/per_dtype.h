/* per_dtype.h -- instantiates a row template once per storage dtype (ce_rows.h, logprobs.h and
 * family.h are each built this way: a header that includes itself as the template).
 *
 * Before including this file, define CE_TEMPLATE (the template's file name, e.g. "ce_rows.h") and
 * the template's own guard macro (so that its inclusion expands the template part). Each
 * instantiation sees:
 *   CE_DT      the dtype code (0 fp32, 1 fp64, 2 fp16, 3 bf16: the codes of the .pyx adapters)
 *   CE_SFX     the name suffix of the storage type (f32, f64, f16, bf16); CE_F(name) appends it
 *   CE_ASFX    the suffix of the accumulation type (f64 for fp64, else f32); CE_A(name) appends it
 *   CE_T       the storage type, CE_ACC the accumulation type (fp64 accumulates in fp64, the
 *              others in fp32), CE_NARROW 16-bit storage, CE_LOAD/CE_STORE the conversions.
 */
#ifndef CELOSS_PER_DTYPE_H
#define CELOSS_PER_DTYPE_H
#define CE_CAT_(a, b) a##_##b
#define CE_CAT(a, b) CE_CAT_(a, b)
#define CE_F(name) CE_CAT(name, CE_SFX)
#define CE_A(name) CE_CAT(name, CE_ASFX)
#define CE_NARROW (CE_DT >= 2)
#endif

/* the blocks only (re)define what changes from the one before */
#define CE_DT 1
#define CE_SFX f64
#define CE_ASFX f64
#define CE_T double
#define CE_ACC double
#define CE_LOAD(v) (v)
#define CE_STORE(v) (v)
#include CE_TEMPLATE

#undef CE_DT
#undef CE_SFX
#undef CE_ASFX
#undef CE_T
#undef CE_ACC
#define CE_DT 0
#define CE_SFX f32
#define CE_ASFX f32
#define CE_T float
#define CE_ACC float
#include CE_TEMPLATE

#undef CE_DT
#undef CE_SFX
#undef CE_T
#undef CE_LOAD
#undef CE_STORE
#define CE_DT 3
#define CE_SFX bf16
#define CE_T uint16_t
#define CE_LOAD(v) ce_bf2f(v)
#define CE_STORE(v) ce_f2bf(v)
#include CE_TEMPLATE

#undef CE_DT
#undef CE_SFX
#undef CE_LOAD
#undef CE_STORE
#define CE_DT 2
#define CE_SFX f16
#define CE_LOAD(v) ce_h2f(v)
#define CE_STORE(v) ce_f2h(v)
#include CE_TEMPLATE

#undef CE_DT
#undef CE_SFX
#undef CE_LOAD
#undef CE_STORE
#undef CE_ASFX
#undef CE_T
#undef CE_ACC
#undef CE_TEMPLATE
