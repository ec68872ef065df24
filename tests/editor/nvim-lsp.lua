-- Neovim (0.7 or later) as the language server's client, headless: starts `switchyard lsp` through vim.lsp,
-- opens a rule file, waits for the published diagnostics, asks for completion after `event.` and writes what the
-- editor got as JSON to $OUT. Run: SWITCHYARD=bin RULES=file OUT=file nvim --headless --clean -c 'luafile this'.
local out = {}
local function finish()
  local f = io.open(os.getenv("OUT"), "w")
  f:write(vim.fn.json_encode(out))
  f:close()
  vim.cmd("qa!")
end

local ok, err = pcall(function()
  vim.cmd("edit " .. vim.fn.fnameescape(os.getenv("RULES")))
  local buf = vim.api.nvim_get_current_buf()
  local client = vim.lsp.start_client({
    name = "switchyard",
    cmd = { os.getenv("SWITCHYARD"), "lsp" },
    root_dir = vim.fn.fnamemodify(os.getenv("RULES"), ":h"),
  })
  assert(client, "the client did not start")
  vim.lsp.buf_attach_client(buf, client)
  vim.wait(10000, function() return #vim.diagnostic.get(buf) > 0 end, 50)
  out.diagnostics = {}
  for _, d in ipairs(vim.diagnostic.get(buf)) do
    table.insert(out.diagnostics, { lnum = d.lnum, col = d.col, severity = d.severity, message = d.message })
  end
  -- Fix the typo as a person would (an edit in the buffer), then wait for the diagnostics to clear.
  local line = vim.api.nvim_buf_get_lines(buf, 4, 5, false)[1]
  vim.api.nvim_buf_set_lines(buf, 4, 5, false, { (line:gsub("becomes", "became")) })
  vim.wait(10000, function() return #vim.diagnostic.get(buf) == 0 end, 50)
  out.after_fix = #vim.diagnostic.get(buf)
  -- Completion right after `event.` on a new line of the `when`.
  local fixed = vim.api.nvim_buf_get_lines(buf, 4, 5, false)[1]
  vim.api.nvim_buf_set_lines(buf, 4, 5, false, { fixed .. " && event." })
  local params = {
    textDocument = { uri = vim.uri_from_bufnr(buf) },
    position = { line = 4, character = #fixed + #" && event." },
  }
  local responses = vim.lsp.buf_request_sync(buf, "textDocument/completion", params, 10000) or {}
  out.completion = {}
  for _, response in pairs(responses) do
    for _, item in ipairs(response.result or {}) do
      table.insert(out.completion, item.label)
    end
  end
  vim.lsp.stop_client(client)
end)
if not ok then out.error = tostring(err) end
finish()
