//! A proxy-wasm HTTP filter that does nothing: a root context that creates HTTP contexts, and
//! HTTP contexts whose callbacks all return `Continue`.
//!
//! It is the floor the Sluice filter's cost is measured against (`scripts/bench-filter.sh`):
//! whatever this filter costs over no filter at all is the price of crossing into the wasm VM
//! for each callback, which no proxy-wasm filter can avoid.

#[cfg(all(target_arch = "wasm32", target_os = "wasi"))]
mod host {
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, ContextType};

    proxy_wasm::main! {{
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(NoopRoot) });
    }}

    struct NoopRoot;

    impl Context for NoopRoot {}

    impl RootContext for NoopRoot {
        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }

        fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(NoopHttp))
        }
    }

    struct NoopHttp;

    impl Context for NoopHttp {}

    // The SDK's defaults already return Continue; spelled out so the benchmark's claim ("the
    // filter does nothing on the headers path") is visible here.
    impl HttpContext for NoopHttp {
        fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
            Action::Continue
        }

        fn on_http_response_headers(
            &mut self,
            _num_headers: usize,
            _end_of_stream: bool,
        ) -> Action {
            Action::Continue
        }
    }
}
